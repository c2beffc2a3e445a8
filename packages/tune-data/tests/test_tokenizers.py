"""The tokenizer interface on the real files of every family: ids, special tokens, round
trips, newline cuts, picking the implementation from the file, and bad files."""

import json
import re

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from tune_data import (
    DataError,
    HFTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from tune_data.tokenizers.base import LLAMA3_PATTERN

ROUND_TRIP = [
    "", " ", "  leading spaces", "trailing space ", "tabs\tand\r\nwindows lines",
    "naïve café 123 — 😀", "日本語のテキスト", "\n\nstarts with newlines", "a\n  b\n\n c ",
    "emoji 👩‍👩‍👧 zwj", "<noinput>", "x" * 3000,
]

# Texts that follow a cut: each starts with a character that is not whitespace, or is empty.
AFTER_CUT = [
    "", "Hello", "naïve café 123 — 😀", "日本語のテキスト", "<noinput>", "x" * 3000,
    "'s contraction", "123456 digits", "—dash", "a\n  b\n\n c ", "emoji 👩‍👩‍👧 zwj",
    "tabs\tand\r\nwindows lines", "trailing space ", "ends with newlines\n\n", ".\n\n### x",
]
HEADS = ["Instruction:\n", "x.\n", "\n", "ends with space \n", "a\n\n", "Tips.\n\n", "1\n"]


def test_meta_test_sentence_with_bos_and_eos(llama3_tokenizer):
    # The ids Meta's own tokenizer test expects.
    ids = llama3_tokenizer.encode("This is a test sentence.", add_bos=True, add_eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3_tokenizer.decode(ids) == "This is a test sentence."


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_all_46_reference_vectors(family, request):
    tokenizer = request.getfixturevalue(f"{family}_tokenizer")
    vectors = request.getfixturevalue(f"{family}_vectors")
    assert len(vectors) == 46
    texts = [text for text, _ in vectors]
    wrong = [text for text, ids in vectors if tokenizer.encode(text, add_bos=False) != ids]
    assert wrong == []
    assert tokenizer.encode_batch(texts, add_bos=False) == [ids for _, ids in vectors]


def test_sentencepiece_families(tokenizer, mistral_tokenizer):
    assert mistral_tokenizer.encode("Hello world", add_bos=False) == [22557, 1526]
    assert tokenizer.encode("Hello world", add_bos=False) == [15043, 3186]
    for tok in (tokenizer, mistral_tokenizer):
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
        assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
        assert tok.stop_tokens == (2,)
        assert tok.token_id("</s>") == 2


def test_llama3_special_tokens_by_meta_names(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.vocab_size == 128256 and len(tok.special_tokens) == 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    named = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    assert {name: tok.token_id(name) for name in named} == named
    assert set(tok.stop_tokens) == {128001, 128008, 128009}
    assert tok.id_to_piece(128009) == "<|eot_id|>" and tok.id_to_piece(2028) == "This"


def test_qwen2_has_no_bos_and_ends_with_endoftext(qwen2_tokenizer):
    tok = qwen2_tokenizer
    assert tok.bos_id is None and tok.vocab_size == 151936
    assert (tok.eos_id, tok.pad_id) == (151643, 151643)  # tokenizer_config.json's choice
    assert {n: tok.token_id(n) for n in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")} == {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    }
    assert set(tok.stop_tokens) == {151643, 151645}  # a chat model's turn ends at <|im_end|>
    hello = tok.encode("Hello world", add_bos=False)
    assert tok.encode("Hello world", add_bos=True, add_eos=True) == [*hello, 151643]


# Qwen3's published chat example and its ids (../shared/data/README.md: checked with the
# tokenizers library against llama.cpp's Qwen2 vectors).
QWEN3_CHAT = ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
              "</think>\n\n4<|im_end|>")
QWEN3_CHAT_IDS = [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091,
                  198, 151667, 271, 151668, 271, 19, 151645]


def test_qwen3_from_vocab_and_merges_is_transformers_tokenizer(
    qwen3_tokenizer, qwen3_tokenizer_path, qwen2_vectors, sharegpt_json_path
):
    """The real Qwen3 folder has no tokenizer.json: vocab.json + merges.txt + the 26 added
    tokens of tokenizer_config.json give transformers' own tokenizer for that folder."""
    from transformers import AutoTokenizer

    tok = qwen3_tokenizer
    hf = AutoTokenizer.from_pretrained(qwen3_tokenizer_path.parent)
    assert tok.vocab_size == 151669 == len(hf) and tok.bos_id is None
    every = range(tok.vocab_size)
    assert [tok.id_to_piece(i) for i in every] == hf.convert_ids_to_tokens(list(every))
    assert (tok.eos_id, tok.pad_id) == (151645, 151643)  # <|im_end|>, <|endoftext|>
    assert set(tok.stop_tokens) == {151645, 151643}  # generation_config.json's eos_token_id
    assert len(tok.special_tokens) == 14 and "<think>" not in tok.special_tokens
    # <think> / </think> are added tokens but not special: read in text, as transformers does.
    thought = tok.encode("<think>\nx\n</think>", add_bos=False)
    assert (thought[0], thought[-1]) == (151667, 151668)
    assert tok.encode("Hello world", add_bos=False) == [9707, 1879]
    assert [tok.encode(t, add_bos=False) for t, _ in qwen2_vectors] == [i for _, i in qwen2_vectors]
    texts = [m["value"] for r in json.loads(sharegpt_json_path.read_text())
             for m in r["conversations"]]
    assert tok.encode_batch(texts, add_bos=False) == hf(texts, add_special_tokens=False)[
        "input_ids"]
    # The control tokens of the chat example are read by name by chat templates (in data
    # they stay text): the pieces between them, encoded apart, give the published ids.
    parts = re.split(r"(<\|im_start\|>|<\|im_end\|>)", QWEN3_CHAT)
    ids = [i for p in parts if p for i in ([tok.token_id(p)] if p in tok.special_tokens
                                           else tok.encode(p, add_bos=False))]
    assert ids == QWEN3_CHAT_IDS == hf(QWEN3_CHAT, add_special_tokens=False)["input_ids"]
    for where in (qwen3_tokenizer_path, qwen3_tokenizer_path.parent):
        loaded = load_tokenizer(where)
        assert type(loaded) is HFTokenizer and loaded.fingerprint == tok.fingerprint


def test_vocab_and_merges_that_tune_cannot_build_are_one_line(tmp_path, qwen3_tokenizer_path):
    source = qwen3_tokenizer_path.parent

    def folder(name, config=None, files=("vocab.json", "merges.txt")):
        made = tmp_path / name
        made.mkdir()
        for f in files:
            (made / f).symlink_to(source / f)
        settings = json.loads((source / "tokenizer_config.json").read_text())
        (made / "tokenizer_config.json").write_text(json.dumps({**settings, **(config or {})}))
        return made

    decoder = json.loads((source / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    moved = {str(int(i) + 1): t for i, t in decoder.items()}  # one id past where they belong
    cases = [
        (folder("no_merges", files=("vocab.json",)),
         "no_merges has no tokenizer.json and no merges.txt; pass the model's tokenizer.json"),
        (folder("gpt2", {"tokenizer_class": "GPT2Tokenizer"}),
         "gpt2 holds vocab.json and merges.txt but no tokenizer.json, and its "
         "tokenizer_config.json names tokenizer_class 'GPT2Tokenizer'; tune builds a tokenizer "
         "from those two files for Qwen2Tokenizer (Qwen2, Qwen2.5, Qwen3) only: pass the "
         "model's tokenizer.json"),
        (folder("moved", {"added_tokens_decoder": moved}),
         "moved/tokenizer_config.json gives '<|endoftext|>' the id 151644, but it lands at "
         "151643 after the 151,643 ids of "),
    ]
    for path, message in cases:
        for where in (path, path / "vocab.json"):
            with pytest.raises(DataError) as error:
                load_tokenizer(where)
            assert message in str(error.value) and "\n" not in str(error.value)


def test_gemma_sentencepiece_special_pieces_and_transformers_ids(
    gemma3_tokenizer, gemma3_tokenizer_path, sharegpt_json_path
):
    """Gemma 3's ids (pad 0, eos 1, bos 2, unk 3), its turn markers as control tokens (they
    are user-defined pieces in its file), and the ids of transformers' GemmaTokenizer, which
    converts the same file."""
    from transformers import GemmaTokenizer

    tok = gemma3_tokenizer
    hf = GemmaTokenizer.from_pretrained(gemma3_tokenizer_path.parent)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2) == (
        hf.pad_token_id, hf.eos_token_id, hf.bos_token_id)
    end = tok.token_id("<end_of_turn>")
    assert tok.token_id("<start_of_turn>") == hf.convert_tokens_to_ids("<start_of_turn>")
    assert end == hf.convert_tokens_to_ids("<end_of_turn>")
    assert tok.stop_tokens == (1, end)  # generation ends at EOS or the end of a turn
    ids = tok.encode("Hi<end_of_turn>\n", add_bos=True)
    assert ids[0] == 2 and end in ids and tok.decode(ids) == "Hi\n"  # turn markers left out
    texts = [m["value"] for r in json.loads(sharegpt_json_path.read_text())
             for m in r["conversations"]] + ROUND_TRIP
    assert tok.encode_batch(texts, add_bos=False) == hf(texts, add_special_tokens=False)[
        "input_ids"]
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text


def test_an_unknown_special_token_name_is_one_line(llama3_tokenizer):
    with pytest.raises(DataError, match="has no special token '<|im_end|>'; it has <|begin") as e:
        llama3_tokenizer.token_id("<|im_end|>")
    assert "\n" not in str(e.value) and "reserved" not in str(e.value)


@pytest.mark.parametrize(
    "family, control", [("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>"), ("", "</s>")]
)
def test_special_token_names_in_data_are_plain_text(family, control, request):
    # A record that contains "<|eot_id|>" must not end the model's turn.
    tok = request.getfixturevalue(f"{family}_tokenizer" if family else "tokenizer")
    text = f"before {control} after"
    ids = tok.encode(text, add_bos=False)
    assert tok.token_id(control) not in ids
    assert tok.decode(ids) == text


def test_round_trips_and_special_tokens_left_out(any_tokenizer):
    batch = any_tokenizer.encode_batch(ROUND_TRIP, add_bos=True, add_eos=True)
    assert batch == [any_tokenizer.encode(t, add_bos=True, add_eos=True) for t in ROUND_TRIP]
    for text, ids in zip(ROUND_TRIP, batch):
        assert ids[-1] == any_tokenizer.eos_id
        assert any_tokenizer.decode(ids) == text


def test_ids_past_the_vocabulary_decode_to_nothing(any_tokenizer):
    # A model's embedding may have more rows than its tokenizer has ids (Qwen2.5 pads 151,665
    # to 151,936); a sampled padding id must not crash generation.
    ids = any_tokenizer.encode("Hello world")
    beyond = [any_tokenizer.vocab_size, any_tokenizer.vocab_size + 271]
    assert any_tokenizer.decode(ids[:1] + beyond + ids[1:]) == "Hello world"


def test_a_sample_decodes_piece_by_piece(any_tokenizer):
    # render_sample decodes a sample in runs; mid-text runs keep their leading space.
    tok = any_tokenizer
    text = "Give three tips for staying healthy.\n\nEat well, sleep, move."
    ids = tok.encode(text, add_bos=False)
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) + tok.decode_continuation(ids[cut:]) == text, cut


def test_text_after_a_newline_cut_encodes_as_inside_the_whole(
    any_tokenizer, alpaca_records, tinyshakespeare_path
):
    # What lets datasets tokenise a template's fixed text once: cut just after a newline
    # whose next character is not whitespace, the parts' ids joined are the whole text's.
    tok = any_tokenizer
    assert tok.cuts_after_newline
    fields = [r[k] for r in alpaca_records[:200] for k in ("instruction", "output")]
    paragraphs = tinyshakespeare_path.read_text().split("\n\n")[:100]
    tails = [t for t in AFTER_CUT + fields + paragraphs if not t[:1].isspace()]
    ids, offsets = tok.encode_after_newline(tails)
    tail_ids = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    for head in HEADS:
        head_ids = tok.encode(head, add_bos=False)
        for tail, after in zip(tails, tail_ids):
            assert head_ids + after == tok.encode(head + tail, add_bos=False), (head, tail)


def test_a_cut_before_whitespace_is_not_a_boundary_for_byte_level_bpe(
    llama3_tokenizer, qwen2_tokenizer
):
    # Why the datasets check each record's fields: Llama 3's punctuation takes the newlines
    # that follow it, so "x.\n" + "\nfoo" is not "x.\n" then "\nfoo".
    for tok in (llama3_tokenizer, qwen2_tokenizer):
        parts = tok.encode("x.\n", add_bos=False) + tok.encode("\nfoo", add_bos=False)
        assert parts != tok.encode("x.\n\nfoo", add_bos=False)


def test_fingerprints_tell_tokenizers_apart(any_tokenizer, request):
    again = type(any_tokenizer)(any_tokenizer.path)
    assert again.fingerprint == any_tokenizer.fingerprint
    others = {request.getfixturevalue(n).fingerprint
              for n in ("tokenizer", "mistral_tokenizer", "llama3_tokenizer", "qwen2_tokenizer")}
    assert len(others) == 4


def test_load_tokenizer_picks_the_implementation_from_the_file(
    llama2_tokenizer_path, mistral_tokenizer_path, llama3_tokenizer_path, qwen2_tokenizer_path
):
    cases = [
        (llama2_tokenizer_path, SentencePieceTokenizer, [15043, 3186]),
        (mistral_tokenizer_path, SentencePieceTokenizer, [22557, 1526]),
        (llama3_tokenizer_path, Llama3Tokenizer, [9906, 1917]),
        (qwen2_tokenizer_path, HFTokenizer, [9707, 1879]),
    ]
    for path, cls, hello in cases:
        for where in (path, path.parent):  # the file, or the folder holding it
            tok = load_tokenizer(where)
            assert type(tok) is cls and isinstance(tok, Tokenizer)
            assert tok.encode("Hello world", add_bos=False) == hello
    assert type(load_tokenizer(llama3_tokenizer_path, kind="tiktoken")) is Llama3Tokenizer


def test_a_file_of_another_kind_names_the_file_and_what_to_pass(
    llama2_tokenizer_path, llama3_tokenizer_path, qwen2_tokenizer_path
):
    cases = [
        (lambda: load_tokenizer(llama3_tokenizer_path, kind="sentencepiece"),
         f"{llama3_tokenizer_path} is a tiktoken BPE file \\(Llama 3's tokenizer.model\\), not "
         "a SentencePiece model: read it as kind 'tiktoken', or pass a SentencePiece "
         "tokenizer.model"),
        (lambda: Llama3Tokenizer(llama2_tokenizer_path),
         "is a SentencePiece model, not a tiktoken BPE file .*: read it as kind "
         "'sentencepiece', or pass Llama 3's tiktoken tokenizer.model"),
        (lambda: HFTokenizer(llama3_tokenizer_path),
         "is a tiktoken BPE file .*, not a Hugging Face tokenizer.json: read it as kind "
         "'tiktoken', or pass a tokenizer.json"),
        (lambda: SentencePieceTokenizer(qwen2_tokenizer_path),
         "is a Hugging Face tokenizer.json, not a SentencePiece model: read it as kind 'hf'"),
        (lambda: load_tokenizer(llama2_tokenizer_path, kind="bpe"),
         "unknown tokenizer kind 'bpe'; choose from sentencepiece, tiktoken, hf"),
    ]
    for make, message in cases:
        with pytest.raises(DataError, match=message) as error:
            make()
        assert "\n" not in str(error.value)


def test_damaged_files_are_one_line_naming_the_file(tmp_path, llama3_tokenizer_path):
    junk = tmp_path / "junk" / "tokenizer.model"
    junk.parent.mkdir()
    junk.write_bytes(bytes(range(7, 200)) * 20)
    truncated = tmp_path / "cut" / "tokenizer.model"
    truncated.parent.mkdir()
    lines = llama3_tokenizer_path.read_bytes().splitlines(keepends=True)
    truncated.write_bytes(b"".join(lines[:1000]) + lines[1000][:5])
    broken_json = tmp_path / "json" / "tokenizer.json"
    broken_json.parent.mkdir()
    broken_json.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    cases = [
        (lambda: load_tokenizer(junk), f"{junk} is not a tokenizer file tune reads"),
        (lambda: load_tokenizer(truncated),
         f"{truncated} is a damaged tiktoken file \\(line 1001 is not 'base64-token rank'\\)"),
        (lambda: load_tokenizer(broken_json),
         f"{broken_json} is not a Hugging Face tokenizer.json \\(damaged, truncated"),
        (lambda: load_tokenizer(tmp_path / "nothing.model"), "nothing.model not found"),
        (lambda: load_tokenizer(tmp_path),
         "holds no tokenizer.model, tokenizer.json or vocab.json"),
    ]
    for make, message in cases:
        with pytest.raises(DataError, match=message) as error:
            make()
        assert "\n" not in str(error.value)


def test_a_llama3_file_cut_at_a_line_end_is_refused_not_renumbered(tmp_path,
                                                                  llama3_tokenizer_path):
    """Cut after its first 5,000 ranks, every line still parses: the special tokens would
    then follow rank 4,999 (<|begin_of_text|> = 5000, not 128000)."""
    cut = tmp_path / "tokenizer.model"
    cut.write_bytes(b"".join(llama3_tokenizer_path.read_bytes().splitlines(keepends=True)[:5000]))
    for make in (lambda: Llama3Tokenizer(cut), lambda: load_tokenizer(cut)):
        with pytest.raises(DataError) as error:
            make()
        assert str(error.value) == (
            f"{cut} holds 5,000 tokens, but Llama 3's tiktoken file holds 128,000 (its special "
            "tokens start at id 128000): it is cut short or another model's file; pass the "
            "tokenizer.model that came with the Llama 3 checkpoint")


SENTENCES = [
    "The cat sat on the mat.\nIt was warm.", "A dog ran.\n\nThe end!", "Numbers 12345 and 678.",
    "  indented line\n\tand a tab", "It's what they'd do; we'll see.",
] * 20


def _tiny_tokenizer_json(folder, pre_tokenizer, special_tokens=("</s>",)):
    """A small byte-level BPE trained here, saved as folder/tokenizer.json."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_tokenizer_json_cuts_only_under_a_known_safe_pipeline(tmp_path):
    safe = HFTokenizer(_tiny_tokenizer_json(tmp_path / "safe", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])))
    assert safe.cuts_after_newline
    for head in HEADS:
        for tail in AFTER_CUT:
            after = safe.encode_after_newline([tail])[0].tolist()
            assert safe.encode(head, add_bos=False) + after == safe.encode(head + tail,
                                                                          add_bos=False)
    # GPT-2's pattern: " \n" at the end of a text is one piece, inside it two; not cut.
    gpt2 = HFTokenizer(_tiny_tokenizer_json(
        tmp_path / "gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False)))
    assert not gpt2.cuts_after_newline
    # No tokenizer_config.json: EOS is a well-known end token, padding falls back to it.
    assert (safe.bos_id, safe.eos_id, safe.pad_id) == (None, safe.token_id("</s>"),
                                                      safe.token_id("</s>"))


def test_tokenizer_json_bos_eos_from_the_files_beside_it(tmp_path):
    names = ("<s>", "</s>", "<pad>", "<eot>")
    path = _tiny_tokenizer_json(tmp_path / "tok", pre_tokenizers.ByteLevel(),
                                special_tokens=names)
    bos, end, pad, eot = (RustTokenizer.from_file(str(path)).token_to_id(n) for n in names)
    (path.parent / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "add_bos_token": True, "eos_token": "<eot>",
        "pad_token": "<pad>",
    }))
    (path.parent / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot]}))
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eot, pad)
    assert set(tok.stop_tokens) == {eot, end}  # and the well-known "</s>"
    assert tok.encode("cat", add_eos=True) == [bos, *tok.encode("cat", add_bos=False), eot]


def test_tokenizer_json_without_an_end_token_is_refused(tmp_path):
    path = _tiny_tokenizer_json(tmp_path / "tok", pre_tokenizers.ByteLevel(), special_tokens=())
    with pytest.raises(DataError, match="names no end-of-sequence token; put the model's "
                                        "tokenizer_config.json"):
        HFTokenizer(path)
