"""SentencePiece tokenizers (Llama 2, Mistral, Gemma 3): a thin, typed wrapper around the
library."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

from tune_data.ragged import flatten, gather
from tune_data.tokenizers.base import (
    Tokenizer,
    fingerprint,
    read_tokenizer_file,
    wrong_format,
)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``tokenizer.model`` with its own special ids (Llama 2: bos 1, eos 2;
    Gemma 3: pad 0, eos 1, bos 2, unk 3).

    Special tokens are the model's control pieces, its unknown piece and the chat-turn
    pieces of :data:`TURN_PIECES` (Gemma's ``<start_of_turn>`` and ``<end_of_turn>``,
    user-defined pieces in its file, which transformers marks special too); generation
    stops at EOS and ``<end_of_turn>``, and decoding leaves them all out. A user-defined
    piece is matched wherever its text occurs, so unlike the other families a text holding
    ``<end_of_turn>`` encodes to that token (as transformers encodes it); chat templates
    refuse a message holding one.

    Args:
        path: The ``tokenizer.model`` file that ships with the checkpoint, or its folder.

    Raises:
        DataError: If the file is missing or is not a SentencePiece model.

    Example:
        >>> tok = SentencePieceTokenizer("tokenizer.model")
        >>> tok.encode("Hello world", add_bos=False)
        [15043, 3186]
    """

    def __init__(self, path: str | Path):
        self.path, data = read_tokenizer_file(path, "tokenizer.model", "sentencepiece")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise wrong_format(self.path, "sentencepiece", None) from None
        self._model = data  # the serialized ModelProto, read for _vocabulary_facts
        self.fingerprint = fingerprint("sentencepiece", data)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        # Llama 2 has no pad piece (pad_id() == -1). Padded positions get label -100, so any
        # valid id works; 0 (<unk>) keeps embedding lookups in range.
        self.pad_id = max(self._sp.pad_id(), 0)
        sp = self._sp
        self.special_tokens = {
            sp.id_to_piece(i): i
            for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i)
        }
        turns = {name: sp.piece_to_id(name) for name in TURN_PIECES}
        turns = {name: i for name, i in turns.items() if sp.id_to_piece(i) == name}
        self.special_tokens.update(turns)
        self.stop_tokens = (self.eos_id, *([turns[END_OF_TURN]] if END_OF_TURN in turns else []))
        self._unk_id = sp.unk_id()
        # Ids decode() leaves out besides the control pieces SentencePiece drops itself.
        self._hidden = frozenset({self._unk_id, *turns.values()})
        self._newline = sp.encode("\n")  # [29871, 13]: dummy-prefix "▁" + byte 0x0A

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[list[int]]:
        return self._encode_list(list(texts), add_bos=add_bos, add_eos=add_eos)

    def _encode_list(self, texts: list[str], add_bos: bool = False, add_eos: bool = False
                     ) -> list[list[int]]:
        """SentencePiece's batch call, or a loop for short lists.

        The batch call starts worker threads (one per core asked; measured with
        sentencepiece 0.2.3 on a 2-core machine, it still spends one core's time) and waits
        for them: on a busy machine that wait alone took 2-4 ms, the time a loop needs for
        about a thousand words. Datasets encode their distinct words, often a few hundred.
        """
        if len(texts) < _THREADED_BATCH:
            encode = self._sp.encode
            return [encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=-1)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of texts, each encoded alone without BOS, as one flat array.

        Where spaces are boundaries (:attr:`splits_at_spaces`), by distinct words as in
        :meth:`encode_after_newline`: chat data repeats its turns' wording (and the
        template's), so this is most of SentencePiece's work saved.
        """
        if not self.splits_at_spaces:
            return super().encode_flat(texts)
        return self._encode_words(texts, after_newline=False)

    def encode_after_newline(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of texts that follow a newline, as they come out inside the whole text.

        SentencePiece puts a "▁" (space) before every text it encodes, so
        ``encode(a) + encode(b) != encode(a + b)``. Encoding ``"\\n" + b`` and cutting the
        newline's ids off gives b's ids exactly as in ``a + "\\n" + b`` when the newline is a
        boundary no piece crosses (:attr:`cuts_after_newline`); here b may even start with
        whitespace.

        Where spaces are boundaries too (:attr:`splits_at_spaces`, true for Llama 2 and
        Mistral), each distinct word is encoded once and the texts are assembled from their
        words: the same ids as encoding every text whole, with about a quarter of
        SentencePiece's work on English text (Alpaca 5k: 287k words, 37k distinct).
        """
        if not self.splits_at_spaces:
            cut = len(self._newline)
            encoded = self._encode_list(["\n" + t for t in texts])
            return flatten([ids[cut:] for ids in encoded])
        return self._encode_words(texts, after_newline=True)

    def _encode_words(self, texts: Sequence[str], after_newline: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Texts encoded one distinct word at a time (needs :attr:`splits_at_spaces`).

        A text is cut at spaces; its first word is encoded as the text's start would be
        (after a newline: as ``"\\n" + word``, the newline's ids cut off), the others stand
        alone: SentencePiece's "▁" before a lone word is the space it followed. A text with
        a space where no word follows (double, trailing; leading, for a text's start) or a
        literal "▁" is one word, encoded whole. Chat data repeats whole turns (system
        prompts, greetings): those are split once.
        """
        distinct_texts = list(dict.fromkeys(texts))
        if len(distinct_texts) < len(texts):  # each distinct text is split once
            ids, offsets = self._encode_words(distinct_texts, after_newline)
            index = dict(zip(distinct_texts, range(len(distinct_texts))))
            which = np.fromiter(map(index.__getitem__, texts), dtype=np.int64, count=len(texts))
            return gather(ids, offsets[which], offsets[which + 1] - offsets[which])
        lead = "\n" if after_newline else ""
        words: list[str] = []
        firsts: list[int] = []  # index in words of each text's first word
        for text in texts:
            firsts.append(len(words))
            parts = text.split(" ")
            parts[0] = lead + parts[0]
            if "" in parts or "\u2581" in text:
                parts = [lead + text]
            words += parts
        distinct = list(dict.fromkeys(words))
        word_ids, word_offsets = flatten(self._encode_list(distinct))
        index = dict(zip(distinct, range(len(distinct))))
        which = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))
        first = np.asarray(firsts, dtype=np.int64)
        starts = word_offsets[which]
        if after_newline:
            starts[first] += len(self._newline)  # the leading newline's ids of each text
        ids, offsets = gather(word_ids, starts, word_offsets[which + 1] - starts)
        return ids, np.append(offsets[first], offsets[-1])

    @cached_property
    def _vocabulary_facts(self) -> _VocabularyFacts:
        """What the fast paths need to know about every piece, read from the model file's
        bytes (a millisecond), else from the pieces one by one (about ten on first use)."""
        size = self._sp.get_piece_size()
        found = _piece_spans(self._model, size)
        if found is not None:
            return _facts_from_bytes(*found)
        vocabulary = "\0".join(self._sp.id_to_piece(list(range(size))))
        separable = vocabulary.count("\0") == size - 1  # no NUL in pieces
        return _VocabularyFacts(
            newline="\n" in vocabulary,
            glued_space=not separable or _GLUED_SPACE.search(vocabulary) is not None,
        )

    @cached_property
    def cuts_after_newline(self) -> bool:  # type: ignore[override]
        """True when no piece contains a newline: "\\n" is always the byte piece <0x0A>, so
        text can be encoded in parts cut after any newline (Llama 2, Mistral)."""
        no_piece_spans_newline = not self._vocabulary_facts.newline
        return no_piece_spans_newline and self._newline[-1:] == [self._sp.piece_to_id("<0x0A>")]

    @cached_property
    def splits_at_spaces(self) -> bool:
        """True when text can also be encoded word by word, cut before each single space.

        That holds when no piece has a "▁" right after another character (pieces may start
        with "▁" or be runs of "▁", never span a word boundary), and normalisation only turns
        spaces into "▁" and adds one in front (no NFKC, no whitespace folding). Then BPE's
        merges never cross such a boundary and each word merges alone exactly as in the whole
        text. True for Llama 2 and Mistral.
        """
        probe = " a  b\t\u00a0c\u3000\uff46 \ufb01 e\u0301 \u2460\n "
        plain = self._sp.normalize(probe) == "\u2581" + probe.replace(" ", "\u2581")
        return plain and self.cuts_after_newline and not self._vocabulary_facts.glued_space

    def decode(self, ids: Sequence[int]) -> str:
        # SentencePiece leaves control pieces (<s>, </s>) out by itself, not <unk>; ids past
        # the vocabulary (a model's padded embedding rows) would raise.
        n, hidden = self.vocab_size, self._hidden
        return self._sp.decode([i for i in map(int, ids) if 0 <= i < n and i not in hidden])

    def decode_continuation(self, ids: Sequence[int]) -> str:
        text = self.decode(ids)
        # decode() drops the "▁" that starts a text; inside a text it is a real space.
        if len(ids) and self.id_to_piece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


# User-defined pieces that are chat control tokens: Gemma's turn markers (its model file lists
# them as user-defined, so SentencePiece matches them in text; transformers' converter marks
# them special). END_OF_TURN ends an answer and stops generation.
TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")
END_OF_TURN = "<end_of_turn>"

# The Llama 2 name, kept for code and configs written against it.
Llama2Tokenizer = SentencePieceTokenizer

# Lists shorter than this are encoded in a loop (see SentencePieceTokenizer._encode_list).
_THREADED_BATCH = 1000

# A "▁" after another character of the same piece: a piece that would span a word boundary.
_GLUED_SPACE = re.compile("[^\u2581\0]\u2581")
_SPACE_MARK = "\u2581".encode()  # b"\xe2\x96\x81"


class _VocabularyFacts(NamedTuple):
    newline: bool  # some piece contains "\n"
    glued_space: bool  # some piece has a "▁" right after another character than "▁"


def _piece_spans(model: bytes, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Where each piece's UTF-8 text lies in a serialized ``ModelProto``: (the bytes as
    uint8, starts, lengths), or None when the layout is not the plain one.

    The pieces (field 1) come first, one record each: ``0x0A len 0x0A piece_len piece
    score [type]``. With lengths under 128 (one-byte varints, true of Llama 2's and
    Mistral's models) the records can be found without a Python loop: take the first
    ``size`` places that look like a record's start and check that each record ends exactly
    where the next one starts, from byte 0. That chain proves they are the pieces; anything
    else (a long piece, another layout) returns None and the caller asks SentencePiece.
    """
    b = np.frombuffer(model, dtype=np.uint8)
    if size < 1 or len(b) < 4:
        return None
    at = np.flatnonzero(b[:-3] == 0x0A)
    record, piece = b[at + 1], b[at + 3]
    looks = (b[at + 2] == 0x0A) & (record < 0x80) & (piece < 0x80) & (piece + 2 <= record)
    starts = at[looks][:size]
    if len(starts) < size or starts[0] != 0:
        return None
    ends = starts + 2 + b[starts + 1]
    if ends[-1] > len(b) or not np.array_equal(ends[:-1], starts[1:]):
        return None
    return b, starts + 4, b[starts + 3].astype(np.int64)


def _facts_from_bytes(b: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                      ) -> _VocabularyFacts:
    """:class:`_VocabularyFacts` from the pieces' places in the model's bytes."""
    # Which bytes are piece text: runs alternate between the rest of a record (or what
    # follows the pieces) and a piece's text.
    ends = starts + lengths
    runs = np.empty(2 * len(starts) + 1, dtype=np.int64)
    runs[0], runs[1::2], runs[2:-1:2], runs[-1] = starts[0], lengths, starts[1:] - ends[:-1], (
        len(b) - ends[-1])
    in_piece = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    newline = bool((in_piece & (b == 0x0A)).any())
    # Each "▁" (UTF-8 e2 96 81; e2 only ever leads a character) inside a piece's text.
    mark = np.zeros(len(b), dtype=bool)
    mark[:-2] = (b[:-2] == _SPACE_MARK[0]) & (b[1:-1] == _SPACE_MARK[1]) & (
        b[2:] == _SPACE_MARK[2])
    mark &= in_piece
    # Glued: a "▁" with a character of its piece before it (the byte before lies in a
    # piece, the same one: record headers keep piece texts apart) that is not a "▁" (no
    # mark in a piece starts three bytes earlier). glued[i] is about the mark at i + 1.
    glued = mark[1:] & in_piece[:-1]
    glued[2:] &= ~mark[:-3]
    return _VocabularyFacts(newline=newline, glued_space=bool(glued.any()))
