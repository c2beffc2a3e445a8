"""SentencePiece tokenizers (Llama 2, Mistral): a thin, typed wrapper around the library."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

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
    """A SentencePiece ``tokenizer.model`` with its own special ids (Llama 2: bos 1, eos 2).

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
        self.stop_tokens = (self.eos_id,)
        self._unk_id = sp.unk_id()
        self._newline = sp.encode("\n")  # [29871, 13]: dummy-prefix "▁" + byte 0x0A

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[list[int]]:
        # SentencePiece is asked for a thread per core; measured with sentencepiece 0.2.3 on
        # a 2-core machine, its batch call still spends one core's time.
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=-1)

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
            encoded = self._sp.encode(["\n" + t for t in texts], num_threads=-1)
            return flatten([ids[cut:] for ids in encoded])
        # Every text is encoded as "\n" + text and loses the newline's ids, as above. Cut at
        # spaces, its first word keeps the "\n" and the others stand alone: SentencePiece's
        # "▁" before a lone word is the space it followed. A text with a space where no word
        # follows (double, trailing) or a literal "▁" is one word, encoded whole.
        words: list[str] = []
        firsts: list[int] = []  # index in words of each text's first word
        for text in texts:
            firsts.append(len(words))
            parts = text.split(" ")
            parts[0] = "\n" + parts[0]
            if "" in parts or "\u2581" in text:
                parts = ["\n" + text]
            words += parts
        distinct = list(dict.fromkeys(words))
        word_ids, word_offsets = flatten(self._sp.encode(distinct, num_threads=-1))
        index = dict(zip(distinct, range(len(distinct))))
        which = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))
        first = np.asarray(firsts, dtype=np.int64)
        skip = np.zeros(len(words), dtype=np.int64)
        skip[first] = len(self._newline)  # the leading newline's ids of each text
        starts = word_offsets[which] + skip
        ids, offsets = gather(word_ids, starts, word_offsets[which + 1] - starts)
        return ids, np.append(offsets[first], offsets[-1])

    @cached_property
    def _vocabulary(self) -> str:
        """Every piece, joined by NUL: one string a single search scans in a millisecond."""
        return "\0".join(self._sp.id_to_piece(list(range(self._sp.get_piece_size()))))

    @cached_property
    def cuts_after_newline(self) -> bool:  # type: ignore[override]
        """True when no piece contains a newline: "\\n" is always the byte piece <0x0A>, so
        text can be encoded in parts cut after any newline (Llama 2, Mistral)."""
        no_piece_spans_newline = "\n" not in self._vocabulary
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
        vocabulary = self._vocabulary
        separable = vocabulary.count("\0") == self._sp.get_piece_size() - 1  # no NUL in pieces
        return (
            plain
            and separable
            and self.cuts_after_newline
            and _GLUED_SPACE.search(vocabulary) is None
        )

    def decode(self, ids: Sequence[int]) -> str:
        # SentencePiece leaves control pieces (<s>, </s>) out by itself, not <unk>; ids past
        # the vocabulary (a model's padded embedding rows) would raise.
        n = self.vocab_size
        return self._sp.decode([i for i in map(int, ids) if 0 <= i < n and i != self._unk_id])

    def decode_continuation(self, ids: Sequence[int]) -> str:
        text = self.decode(ids)
        # decode() drops the "▁" that starts a text; inside a text it is a real space.
        if len(ids) and self.id_to_piece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


# The Llama 2 name, kept for code and configs written against it.
Llama2Tokenizer = SentencePieceTokenizer

# A "▁" after another character of the same piece: a piece that would span a word boundary.
_GLUED_SPACE = re.compile("[^\u2581\0]\u2581")
