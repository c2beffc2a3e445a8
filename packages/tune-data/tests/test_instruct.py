"""Instruction datasets on the real Alpaca records and on handmade edge cases."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tune_data import (
    ALPACA,
    DATASETS,
    IGNORE_INDEX,
    DataError,
    PromptTemplate,
    alpaca_dataset,
    describe,
    instruct,
    instruct_dataset,
    is_empty_input,
    text_completion_dataset,
)
from tune_data.instruct import _Encoder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _check_sample(sample, prompt_ids, response_ids, tokenizer, train_on_input=False):
    """tokens = BOS + prompt + response + EOS; labels shifted, -100 on the prompt."""
    tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
    assert tokens == [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]
    first_target = 1 if train_on_input else 1 + len(prompt_ids)
    expected = [IGNORE_INDEX] * len(tokens)
    for i in range(first_target - 1, len(tokens) - 1):
        expected[i] = tokens[i + 1]
    assert labels == expected


def test_real_alpaca_tokens_and_masks(alpaca, alpaca_records, tokenizer):
    assert alpaca.source_rows == 5000 and len(alpaca) == 5000
    records = [alpaca_records[r] for r in alpaca.rows]
    prompts = tokenizer.encode_batch([ALPACA.render(r) for r in records], add_bos=False)
    wholes = tokenizer.encode_batch(
        [ALPACA.render(r) + r["output"] for r in records], add_bos=False
    )
    for j, (prompt, whole) in enumerate(zip(prompts, wholes)):
        sample = alpaca[j]
        if alpaca.truncated[j]:
            # Cut to 512 with the prompt whole and no EOS: the answer did not end there.
            full = [tokenizer.bos_id, *whole]
            assert sample["tokens"].tolist() == full[:512]
            assert sample["tokens"][-1] != tokenizer.eos_id
            assert (sample["labels"][: len(prompt)] == IGNORE_INDEX).all()
            continue
        # Field-by-field encoding equals encoding the whole prompt + response text.
        assert whole[: len(prompt)] == prompt
        _check_sample(sample, prompt, whole[len(prompt) :], tokenizer)
    assert alpaca.truncated.sum() == 3


def test_noinput_placeholders_use_the_template_without_input(alpaca, alpaca_records, tokenizer):
    placeholder_rows = [
        i for i, r in enumerate(alpaca_records) if r["input"] and is_empty_input(r["input"])
    ]
    assert len(placeholder_rows) >= 31  # "<noinput>", "No input.", "N/A", ...
    where = {int(r): j for j, r in enumerate(alpaca.rows)}
    for row in placeholder_rows:
        prompt = tokenizer.decode(alpaca[where[row]]["tokens"].tolist()).split("### Response:")[0]
        assert "### Input:" not in prompt
        assert prompt.startswith("Below is an instruction that describes a task. Write")
    # A real input that merely starts like a placeholder is kept.
    assert not is_empty_input("No input is too small for this function")


def test_train_on_input_takes_loss_on_the_prompt(tokenizer, alpaca_json_path, datasets_cache):
    ds = alpaca_dataset(
        tokenizer, data_files=alpaca_json_path, split="train[:50]", train_on_input=True,
        cache_dir=datasets_cache,
    )
    for j in range(len(ds)):
        tokens, labels = ds[j]["tokens"], ds[j]["labels"]
        assert labels[:-1].tolist() == tokens[1:].tolist() and labels[-1] == IGNORE_INDEX


EDGE_RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Stay silent.", "input": "", "output": ""},
    {"instruction": "Translate to emoji.", "input": "I love pizza",
     "output": "❤️🍕 naïve 日本語 👩‍👩‍👧"},
    {"instruction": "Summarize.", "input": "<noinput>", "output": "Nothing to summarize."},
    {"instruction": "Write a long answer.", "input": "", "output": "word " * 400},
    {"instruction": "very " * 100, "input": "long prompt", "output": "z"},
    {"instruction": "", "input": "", "output": "An empty instruction."},
]


@pytest.fixture
def edge_dataset(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS)
    return alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")


def test_handmade_edge_cases(edge_dataset, tokenizer):
    ds = edge_dataset
    assert ds.source_rows == 7
    assert ds.rows.tolist() == [0, 1, 2, 3, 4, 6]  # row 5's prompt leaves no room: dropped
    by_row = {int(r): j for j, r in enumerate(ds.rows)}

    empty_out = ds[by_row[1]]  # empty output: the only target is EOS
    assert empty_out["tokens"][-1] == tokenizer.eos_id
    assert (empty_out["labels"] != IGNORE_INDEX).sum() == 1
    assert empty_out["labels"][-2] == tokenizer.eos_id

    emoji = ds[by_row[2]]
    trained = emoji["tokens"][1:][emoji["labels"][:-1] != IGNORE_INDEX]
    assert tokenizer.decode(trained.tolist()) == EDGE_RECORDS[2]["output"]

    placeholder = tokenizer.decode(ds[by_row[3]]["tokens"].tolist())
    assert "<noinput>" not in placeholder and "### Input:" not in placeholder

    long = ds[by_row[4]]
    assert len(long["tokens"]) == 96 and ds.truncated[by_row[4]]
    assert long["tokens"][-1] != tokenizer.eos_id

    stats = describe(ds)
    assert (stats.dropped, stats.dropped_rows, stats.truncated, stats.truncated_rows) == (
        1, [5], 1, [4],
    )
    assert stats.no_loss == 0
    assert "1 record(s) dropped" in str(stats) and "rows 5" in str(stats)


def test_a_row_with_a_missing_column_is_an_error_naming_row_and_column(tmp_path, tokenizer):
    records = [dict(r) for r in EDGE_RECORDS[:4]]
    del records[2]["output"]
    path = write_jsonl(tmp_path / "missing.jsonl", records)
    with pytest.raises(DataError, match=r"row 2 .*'output'"):
        alpaca_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "c")


def test_csv_with_other_column_names_needs_a_column_map(tmp_path, tokenizer):
    path = tmp_path / "qa.csv"
    path.write_text('instruction,input,answer\nName a colour.,,Blue\n"Add, please",2+2,4\n')
    with pytest.raises(DataError, match=r"no 'output' column .*column_map"):
        alpaca_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "c")
    ds = alpaca_dataset(
        tokenizer, data_files=path, column_map={"output": "answer"}, cache_dir=tmp_path / "c"
    )
    assert len(ds) == 2
    # The empty csv cell is an empty input (not NaN), so the no-input template is used.
    first = tokenizer.decode(ds[0]["tokens"].tolist())
    assert "### Input:" not in first and first.endswith("Blue")
    assert "### Input:\n2+2" in tokenizer.decode(ds[1]["tokens"].tolist())


def test_parquet_with_a_custom_template(tmp_path, tokenizer):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"q": ["Capital of France?", "2+2?"], "a": ["Paris", "4"]}), path)
    template = "### Question:\n{question}\n\n### Answer:\n"  # a config gives a plain string
    ds = instruct_dataset(
        tokenizer, "parquet", template, data_files=path, response_field="answer",
        column_map={"question": "q", "answer": "a"}, cache_dir=tmp_path / "c",
    )
    text = "### Question:\nCapital of France?\n\n### Answer:\n"
    prompt = tokenizer.encode(text, add_bos=False)
    whole = tokenizer.encode(text + "Paris", add_bos=False)
    _check_sample(ds[0], prompt, whole[len(prompt) :], tokenizer)


def test_template_without_newline_boundaries_still_masks_exactly(tmp_path, tokenizer):
    # Not cut at newlines, so the slow path encodes prompt and prompt + response whole; the
    # space before the answer belongs to the answer's first piece ("▁Paris").
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "a": "Paris"}])
    template = PromptTemplate("Q: {q} A: ")
    ds = instruct_dataset(
        tokenizer, str(path), template, response_field="a", cache_dir=tmp_path / "c"
    )
    sample = ds[0]
    assert sample["tokens"].tolist() == tokenizer.encode(
        "Q: Capital of France? A: Paris", add_eos=True
    )
    trained = sample["tokens"][1:][sample["labels"][:-1] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(trained) == "Paris"


def test_fast_and_whole_text_encoding_agree_on_real_records(any_tokenizer, alpaca_records):
    batch = {k: [r[k] for r in alpaca_records[:400]] for k in ("instruction", "input", "output")}
    fast = _Encoder(any_tokenizer, ALPACA, "output", False, 512)
    slow = _Encoder(any_tokenizer, ALPACA, "output", False, 512)
    slow.fast = False
    assert fast.fast
    assert fast(batch, list(range(400))).equals(slow(batch, list(range(400))))


def _reference(tokenizer, template, records, response_field, max_seq_len):
    """What an instruction dataset means, spelled out plainly: BOS + the ids of the whole
    prompt + response text + EOS, the prompt being where ``encode(prompt)`` stops agreeing;
    cut to max_seq_len without EOS, dropped when no response token fits.

    Returns:
        {row: (tokens, number of leading tokens that take no loss)}.
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    out = {}
    for row, record in enumerate(records):
        prompt_text = template.render(record)
        prompt = tokenizer.encode(prompt_text, add_bos=False)
        whole = tokenizer.encode(prompt_text + record[response_field], add_bos=False)
        agree = 0
        while agree < min(len(prompt), len(whole)) and prompt[agree] == whole[agree]:
            agree += 1
        tokens = [*bos, *whole, tokenizer.eos_id]
        head = len(bos) + agree
        if len(tokens) > max_seq_len:
            if head >= max_seq_len:
                continue
            tokens = tokens[:max_seq_len]
        out[row] = (tokens, head)
    return out


def _assert_matches_reference(ds, expected):
    assert ds.rows.tolist() == sorted(expected)
    for j, row in enumerate(ds.rows.tolist()):
        tokens, head = expected[row]
        sample = ds[j]
        assert sample["tokens"].tolist() == tokens, row
        labels = [IGNORE_INDEX] * len(tokens)
        labels[max(head - 1, 0) : -1] = tokens[max(head, 1) :]
        assert sample["labels"].tolist() == labels, row


def test_real_alpaca_with_every_family_is_the_whole_texts_ids(
    any_tokenizer, alpaca_records, alpaca_json_path, tmp_path
):
    ds = alpaca_dataset(any_tokenizer, data_files=alpaca_json_path, cache_dir=tmp_path)
    expected = _reference(any_tokenizer, ALPACA, alpaca_records, "output", 512)
    _assert_matches_reference(ds, expected)
    if any_tokenizer.bos_id is None:  # Qwen2: the prompt's first token comes first
        assert ds[0]["tokens"][0] == any_tokenizer.encode("Below", add_bos=False)[0]


WHITESPACE_RECORDS = [
    {"q": "Plain question?", "c": "Some context.", "a": "Plain answer."},
    {"q": "\nStarts with a newline.", "c": "x", "a": "y"},
    {"q": "Context is empty.", "c": "", "a": "So the template's newlines meet."},
    {"q": "Answer starts with a space.", "c": "ctx", "a": " leading space"},
    {"q": "Answer starts with newlines.", "c": "ctx.", "a": "\n\n1. first\n2. second"},
    {"q": "  indented", "c": "\ttab", "a": ""},
    {"q": "Ends with a newline\n", "c": "ctx \n", "a": "ok\n"},
]


def test_fields_that_start_with_whitespace_are_encoded_whole(any_tokenizer, tmp_path):
    # A cut before whitespace is no boundary for byte-level BPE (Llama 3's ".\n" + "\n"
    # merge), so such records take the whole-text path; the others stay on the fast one.
    template = PromptTemplate("### Question:\n{q}\n\n### Context:\n{c}\n\n### Answer:\n")
    path = write_jsonl(tmp_path / "ws.jsonl", WHITESPACE_RECORDS)
    ds = instruct_dataset(any_tokenizer, str(path), template, response_field="a",
                          max_seq_len=512, cache_dir=tmp_path / "c")
    assert _Encoder(any_tokenizer, template, "a", False, 512).fast
    _assert_matches_reference(ds, _reference(any_tokenizer, template, WHITESPACE_RECORDS, "a", 512))


def test_second_build_reads_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS)
    first = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")
    files = [f["filename"] for f in first.hf_dataset.cache_files]
    stamps = [os.stat(f).st_mtime_ns for f in files]
    again = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")
    assert [f["filename"] for f in again.hf_dataset.cache_files] == files
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # not rewritten
    assert np.array_equal(again.lengths, first.lengths)
    other = alpaca_dataset(tokenizer, data_files=path, max_seq_len=128, cache_dir=tmp_path / "c")
    assert [f["filename"] for f in other.hf_dataset.cache_files] != files


def test_bad_sources_give_one_clear_line(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file .*nope.json not found"):
        alpaca_dataset(tokenizer, data_files=tmp_path / "nope.json")
    odd = tmp_path / "data.xyz"
    odd.write_text("{}")
    with pytest.raises(DataError, match="cannot tell the format"):
        alpaca_dataset(tokenizer, data_files=odd)
    with pytest.raises(DataError, match="max_seq_len must be at least 2"):
        alpaca_dataset(tokenizer, data_files=odd, max_seq_len=1)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "input": "", "output": ')
    with pytest.raises(DataError, match=r"broken.json is not valid JSON \(line 1, column 46: "
                                        r"Expecting value\); fix the file"):
        alpaca_dataset(tokenizer, data_files=broken, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("split", ["train", "train[:2]"])  # our json reader; datasets'
def test_a_bad_json_line_is_named_by_its_number(tmp_path, tokenizer, split):
    """datasets names a byte position ("Trailing data at position 48") or a row of its own
    counting; the user's editor shows line numbers."""
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    bad = '{"instruction": "a" "output": "b"}'  # a comma missing before "output"
    column = bad.index('"output') + 1
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([good, good, good, bad, good]) + "\n")
    with pytest.raises(DataError) as error:
        alpaca_dataset(tokenizer, data_files=path, split=split, cache_dir=tmp_path / "c")
    assert str(error.value) == (f"{path}: line 4 is not valid JSON (Expecting ',' delimiter at "
                                f"column {column}); fix or remove that line")
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(DataError, match=r"records.jsonl: line 2 is a JSON list, not an object"):
        alpaca_dataset(tokenizer, data_files=path, split=split, cache_dir=tmp_path / "c")


def test_unreachable_hub_is_a_data_error(tmp_path, llama2_tokenizer_path):
    code = (
        "from tune_data import SentencePieceTokenizer, alpaca_dataset, DataError\n"
        f"tok = SentencePieceTokenizer({str(llama2_tokenizer_path)!r})\n"
        "try:\n    alpaca_dataset(tok)\nexcept DataError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "could not load 'tatsu-lab/alpaca' from the Hugging Face Hub" in out.stdout
    assert "pass data_files=" in out.stdout


def test_registry_builds_by_name(tmp_path, tokenizer):
    assert {"alpaca", "instruct", "text_completion"} <= set(DATASETS)
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS[:2])
    ds = DATASETS["alpaca"](tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")
    assert len(ds) == 2


ARRAYS = ("_tokens", "_offsets", "_labels", "lengths", "loss_tokens", "rows", "truncated")


def _assert_same_samples(a, b):
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name
    assert a.source_rows == b.source_rows
    assert str(describe(a)) == str(describe(b))


@pytest.fixture
def through_datasets(monkeypatch):
    """Build as if no file were local JSON, so datasets' json loader reads every file."""
    monkeypatch.setattr(instruct, "local_json_files", lambda *args, **kwargs: None)


def test_json_read_directly_gives_what_datasets_gives(alpaca, alpaca_json_path, tmp_path,
                                                      tokenizer, through_datasets):
    # The fixture read the file with the json module (no datasets conversion, own cache).
    assert alpaca.cache_file is not None and alpaca.cache_file.is_file()
    via_datasets = alpaca_dataset(
        tokenizer, data_files=alpaca_json_path, cache_dir=tmp_path / "c"
    )
    assert via_datasets.cache_file is None
    _assert_same_samples(alpaca, via_datasets)


def test_direct_and_datasets_routes_agree_on_truncation_drops_and_input_loss(
    tmp_path, tokenizer, monkeypatch
):
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS)
    for train_on_input in (False, True):
        kwargs = dict(data_files=path, max_seq_len=96, train_on_input=train_on_input)
        direct = alpaca_dataset(tokenizer, cache_dir=tmp_path / "a", **kwargs)
        with monkeypatch.context() as m:
            m.setattr(instruct, "local_json_files", lambda *args, **kwargs: None)
            via_datasets = alpaca_dataset(tokenizer, cache_dir=tmp_path / "b", **kwargs)
        _assert_same_samples(direct, via_datasets)
        assert direct.truncated.sum() == 1 and direct.source_rows - len(direct) == 1


@pytest.mark.parametrize("column, value, kind", [
    ("output", 4, "a number"),
    ("output", 1.5, "a number"),
    ("input", ["a", "b"], "a list"),
    ("instruction", {"task": "add"}, "an object"),
    ("output", True, "true/false"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_value_that_is_not_text_is_an_error_naming_row_and_column(
    tmp_path, tokenizer, column, value, kind, suffix
):
    # Row 2 of otherwise good records: trained on as its Python spelling (['a', 'b']) before.
    records = [dict(r) for r in EDGE_RECORDS[:4]]
    records[2][column] = value
    path = tmp_path / f"records{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        write_jsonl(path, records)
    with pytest.raises(DataError) as e:
        alpaca_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "c")
    message = str(e.value)
    assert f"row 2 (counting from 0) has {kind} in '{column}'" in message, message
    assert "not text" in message and "\n" not in message


def test_a_typed_column_that_is_not_text_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"q": ["2+2?", "3+3?"], "a": [4, 6]}), path)
    with pytest.raises(DataError, match=r"row 0 \(counting from 0\) has a number in 'a'"):
        instruct_dataset(tokenizer, "parquet", "Q: {q}\n", data_files=path, response_field="a",
                         cache_dir=tmp_path / "c")


def test_text_completion_checks_its_column_too(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Some words."}, {"text": [1, 2]}])
    with pytest.raises(DataError, match=r"row 1 \(counting from 0\) has a list in 'text'"):
        text_completion_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "c")


def test_csv_cells_that_look_like_numbers_stay_text(tmp_path, tokenizer):
    # csv has no types: `4` and `1.50` are the answers as written, not numbers to reject or
    # to print back as 4.0 / 1.5.
    path = tmp_path / "sums.csv"
    path.write_text("instruction,input,output\nAdd.,2+2,4\nHalve.,3,1.50\n")
    ds = alpaca_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "c")
    answers = [tokenizer.decode(ds[i]["tokens"].tolist()).rsplit("\n", 1)[1] for i in (0, 1)]
    assert answers == ["4", "1.50"]


def test_a_damaged_cache_file_is_rebuilt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS)
    first = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")
    cached = first.cache_file
    cached.write_bytes(cached.read_bytes()[:100])  # cut short, as by a full disk
    again = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")
    _assert_same_samples(first, again)
    assert again.cache_file == cached and cached.stat().st_size > 100
    # Changed records are new data, whatever the file is called.
    write_jsonl(path, EDGE_RECORDS[:3])
    changed = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "c")
    assert len(changed) == 3 and changed.cache_file != cached


def test_local_json_builds_without_importing_datasets(tmp_path, llama2_tokenizer_path):
    # datasets (and pandas, which pyarrow's conversions pull in) take over a second to
    # import; a build from a json file needs neither, the first time or from the cache.
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS)
    code = (
        "import sys\n"
        "from tune_data import SentencePieceTokenizer, alpaca_dataset\n"
        f"tok = SentencePieceTokenizer({str(llama2_tokenizer_path)!r})\n"
        f"ds = alpaca_dataset(tok, data_files={str(path)!r}, max_seq_len=96, "
        f"cache_dir={str(tmp_path / 'c')!r})\n"
        "print(len(ds), ds.cache_file.is_file(), 'datasets' in sys.modules, "
        "'pandas' in sys.modules, 'tiktoken' in sys.modules, 'tokenizers' in sys.modules)\n"
    )
    for _ in ("cold", "warm"):  # nor the other families' tokenizer libraries
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.split() == ["6", "True"] + ["False"] * 4, out.stderr


def test_records_in_several_batches_give_the_same_samples(tmp_path, tokenizer, monkeypatch):
    # Big files are tokenised in batches (with a progress bar); rows keep counting across them.
    path = write_jsonl(tmp_path / "edge.jsonl", EDGE_RECORDS * 3)
    whole = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96, cache_dir=tmp_path / "a")
    monkeypatch.setattr(instruct, "_LOCAL_BATCH", 4)
    batched = alpaca_dataset(tokenizer, data_files=path, max_seq_len=96,
                             cache_dir=tmp_path / "b")
    _assert_same_samples(whole, batched)
    assert batched.rows.tolist() == [r for r in range(21) if r % 7 != 5]
