"""The SentencePiece tokenizer (Llama 2, Mistral) on the real models: its own fast paths."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from tune_data import DataError, SentencePieceTokenizer

TRICKY = [
    "", " ", "  leading spaces", "trailing space ", "tabs\tand\r\nwindows lines",
    "naïve café 123 — 😀", "日本語のテキスト", "\n\nstarts with newlines", "a\n  b\n\n c ",
    "emoji 👩‍👩‍👧 zwj", "<noinput>", "x" * 3000,
]


@pytest.fixture(params=["tokenizer", "mistral_tokenizer"])
def sp_tokenizer(request):
    """Llama 2's and Mistral's SentencePiece models."""
    return request.getfixturevalue(request.param)


def test_a_folder_means_its_tokenizer_model(llama2_tokenizer_path):
    tok = SentencePieceTokenizer(llama2_tokenizer_path.parent)
    assert tok.encode("Hello world", add_bos=False) == [15043, 3186]


def test_hello_world_and_special_ids(tokenizer):
    assert tokenizer.encode("Hello world", add_bos=False) == [15043, 3186]
    assert tokenizer.encode("Hello world") == [1, 15043, 3186]
    assert tokenizer.encode("Hello world", add_eos=True) == [1, 15043, 3186, 2]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        32000, 1, 2, 0,
    )


def test_encode_batch_matches_encode_and_decode_round_trips(sp_tokenizer):
    batch = sp_tokenizer.encode_batch(TRICKY, add_bos=True, add_eos=True)
    assert batch == [sp_tokenizer.encode(t, add_bos=True, add_eos=True) for t in TRICKY]
    for text, ids in zip(TRICKY, batch):
        assert sp_tokenizer.decode(ids) == text


def test_text_after_any_newline_joins_like_the_whole_text(sp_tokenizer):
    # For SentencePiece every newline is a boundary, even one followed by whitespace.
    tokenizer = sp_tokenizer
    assert tokenizer.cuts_after_newline
    heads = ["Instruction:\n", "x\n", "\n", "ends with space \n"]
    for head in heads:
        tails = _after_newline(tokenizer, TRICKY)
        for tail, tail_ids in zip(TRICKY, tails):
            whole = tokenizer.encode(head + tail, add_bos=False)
            assert tokenizer.encode(head, add_bos=False) + tail_ids == whole, (head, tail)


def test_non_sentencepiece_file_is_refused_with_one_clear_line(tmp_path):
    text_file = tmp_path / "tokenizer.model"
    text_file.write_text("this is not a model\n")
    with pytest.raises(DataError, match="is not a SentencePiece model") as err:
        SentencePieceTokenizer(text_file)
    assert "\n" not in str(err.value)

    hf_json = tmp_path / "tokenizer.json"
    hf_json.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(DataError, match="is a Hugging Face tokenizer.json, not a SentencePiece "
                                        "model: read it as kind 'hf'"):
        SentencePieceTokenizer(hf_json)

    with pytest.raises(DataError, match="not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")


def _continuations_whole(tokenizer, texts):
    """The reference: each text encoded whole after a newline, the newline's ids cut off."""
    cut = len(tokenizer.encode("\n", add_bos=False))
    return [tokenizer.encode("\n" + t, add_bos=False)[cut:] for t in texts]


def _after_newline(tokenizer, texts):
    ids, offsets = tokenizer.encode_after_newline(texts)
    return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def test_word_by_word_encoding_gives_the_whole_texts_ids(
    sp_tokenizer, tinyshakespeare_path, alpaca_records
):
    # Llama 2 and Mistral texts are encoded one distinct word at a time; any spacing must
    # give exactly the ids of the whole text.
    tokenizer = sp_tokenizer
    assert tokenizer.splits_at_spaces
    odd = [
        "a  b", "  ", " x", "x ", "x \ny", "x\n y", "\u2581lead", "a \u2581b", "a\u2581 b",
        "nbsp\u00a0x", "ideographic\u3000space", "\tfirst tab", "e\u0301 \ufb01 \uff46",
    ]
    paragraphs = tinyshakespeare_path.read_text().split("\n\n")[:400]
    fields = [r[k] for r in alpaca_records[:300] for k in ("instruction", "input", "output")]
    texts = TRICKY + odd + paragraphs + fields
    assert _after_newline(tokenizer, texts) == _continuations_whole(tokenizer, texts)


def test_a_vocabulary_with_pieces_across_spaces_is_encoded_whole(tmp_path):
    # A BPE model trained without splitting at whitespace has pieces such as "▁the▁cat":
    # cutting its text at spaces would change the ids, so the tokenizer must not.
    sentences = ["the cat sat on the mat", "the cat ate the rat", "a cat and a rat sat"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
        vocab_size=300, split_by_whitespace=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(path)
    assert tok.cuts_after_newline and not tok.splits_at_spaces
    texts = ["the cat sat", "a cat and a rat", "the  mat ", " the rat", ""]
    assert _after_newline(tok, texts) == _continuations_whole(tok, texts)


def test_encode_flat_gives_each_texts_own_ids(sp_tokenizer):
    # Texts are encoded by distinct words; any spacing must give each text's own ids.
    texts = TRICKY + [
        "a  b", " x", "x ", "\u2581lead", "a \u2581b", "[INST] Who are you? [/INST]",
        "[INST] Who are you? [/INST]", "\nstarts with a newline", "x\n y",
    ]
    ids, offsets = sp_tokenizer.encode_flat(texts)
    got = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert got == [sp_tokenizer.encode(t, add_bos=False) for t in texts]
    assert ids.dtype == np.int32 and offsets.dtype == np.int64


def _trained(tmp_path, **options):
    """A small BPE model trained here, as a tokenizer."""
    sentences = ["the cat sat on the mat", "the cat ate the rat", "a cat and a rat sat"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
        vocab_size=300, normalization_rule_name="identity", remove_extra_whitespaces=False,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2, num_threads=1, **options,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


@pytest.mark.parametrize("symbol, newline_safe, space_safe", [
    ("cat\nrat", False, False),  # a piece across a newline: cuts there would change ids
    ("cat\u2581rat", True, False),  # across a space
    ("\u2581\u2581cat", True, True),  # a run of "▁" then a word spans nothing
    ("x" * 200 + "\u2581y", True, False),  # pieces this long are found another way
    ("x" * 200, True, True),
])
def test_a_vocabulary_is_read_for_pieces_across_newlines_and_spaces(
    tmp_path, symbol, newline_safe, space_safe
):
    tok = _trained(tmp_path, user_defined_symbols=[symbol])
    assert symbol.replace(" ", "\u2581") in [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert (tok.cuts_after_newline, tok.splits_at_spaces) == (newline_safe, space_safe)
    texts = ["the cat sat", "a cat and a rat", "the  mat ", " the rat", "", symbol]
    assert _after_newline(tok, texts) == _continuations_whole(tok, texts)
    ids, offsets = tok.encode_flat(texts)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [
        tok.encode(t, add_bos=False) for t in texts
    ]


def test_llama2_tokenizer_is_still_the_sentencepiece_tokenizer():
    """The README promises the old name to importers: ``Llama2Tokenizer`` is the class that
    reads every SentencePiece tokenizer.model."""
    from tune_data import Llama2Tokenizer

    assert Llama2Tokenizer is SentencePieceTokenizer
