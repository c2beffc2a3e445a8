"""The tokenizer contract other packages code against, on the real Llama 2 model."""

import pytest

from tune_data import DataError, Llama2Tokenizer

TRICKY = [
    "", " ", "  leading spaces", "trailing space ", "tabs\tand\r\nwindows lines",
    "naïve café 123 — 😀", "日本語のテキスト", "\n\nstarts with newlines", "a\n  b\n\n c ",
    "emoji 👩‍👩‍👧 zwj", "<noinput>", "x" * 3000,
]


def test_a_folder_means_its_tokenizer_model(llama2_tokenizer_path):
    tok = Llama2Tokenizer(llama2_tokenizer_path.parent)
    assert tok.encode("Hello world", add_bos=False) == [15043, 3186]


def test_hello_world_and_special_ids(tokenizer):
    assert tokenizer.encode("Hello world", add_bos=False) == [15043, 3186]
    assert tokenizer.encode("Hello world") == [1, 15043, 3186]
    assert tokenizer.encode("Hello world", add_eos=True) == [1, 15043, 3186, 2]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        32000, 1, 2, 0,
    )


def test_encode_batch_matches_encode_and_decode_round_trips(tokenizer):
    batch = tokenizer.encode_batch(TRICKY, add_bos=True, add_eos=True)
    assert batch == [tokenizer.encode(t, add_bos=True, add_eos=True) for t in TRICKY]
    for text, ids in zip(TRICKY, batch):
        assert tokenizer.decode(ids) == text


def test_continuations_join_like_the_whole_text(tokenizer):
    # What lets instruction data be encoded field by field: a text after a newline gets the
    # same ids as inside the whole string.
    assert tokenizer.splits_at_newline
    heads = ["Instruction:\n", "x\n", "\n", "ends with space \n"]
    for head in heads:
        for tail in TRICKY:
            whole = tokenizer.encode(head + tail, add_bos=False)
            tail_ids = tokenizer.encode_continuations([tail])[0]
            assert tokenizer.encode(head, add_bos=False) + tail_ids == whole, (head, tail)


def test_non_sentencepiece_file_is_refused_with_one_clear_line(tmp_path):
    text_file = tmp_path / "tokenizer.model"
    text_file.write_text("this is not a model\n")
    with pytest.raises(DataError, match="is not a SentencePiece model") as err:
        Llama2Tokenizer(text_file)
    assert "\n" not in str(err.value)

    hf_json = tmp_path / "tokenizer.json"
    hf_json.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(DataError, match="Hugging Face tokenizer.json: pass tokenizer.model"):
        Llama2Tokenizer(hf_json)

    with pytest.raises(DataError, match="not found"):
        Llama2Tokenizer(tmp_path / "missing.model")
