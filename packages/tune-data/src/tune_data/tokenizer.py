"""The Llama 2 tokenizer: a thin, typed wrapper around a SentencePiece model."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import cached_property
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from tune_data.errors import DataError


class Llama2Tokenizer:
    """SentencePiece tokenizer with Llama 2's special ids.

    Args:
        path: The ``tokenizer.model`` file that ships with Llama 2 checkpoints, or the folder
            holding it.

    Raises:
        DataError: If the file is missing or is not a SentencePiece model.

    Example:
        >>> tok = Llama2Tokenizer("tokenizer.model")
        >>> tok.encode("Hello world", add_bos=False)
        [15043, 3186]
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.model"
        if not self.path.is_file():
            raise DataError(
                f"tokenizer file {self.path} not found; pass the tokenizer.model file that "
                "came with the checkpoint"
            )
        data = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # sentencepiece raises RuntimeError/OSError with C++ text
            hint = (
                " (it looks like a Hugging Face tokenizer.json: pass tokenizer.model instead)"
                if data.lstrip()[:1] == b"{"
                else ""
            )
            raise DataError(
                f"{self.path} is not a SentencePiece model{hint}; pass the tokenizer.model "
                "file that came with the Llama 2 checkpoint"
            ) from None
        # Part of dataset cache keys: a different vocabulary must never reuse cached tokens.
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        # Llama 2 has no pad piece (pad_id() == -1). Padded positions get label -100, so any
        # valid id works; 0 (<unk>) keeps embedding lookups in range.
        self.pad_id: int = max(self._sp.pad_id(), 0)
        self._newline = self._sp.encode("\n")  # [29871, 13]: dummy-prefix "▁" + byte 0x0A

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of one text.

        Args:
            text: The text.
            add_bos: Put the BOS id first.
            add_eos: Put the EOS id last.

        Returns:
            The ids.
        """
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: list[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[list[int]]:
        """Token ids of many texts in one SentencePiece call.

        SentencePiece is asked for a thread per core; measured with sentencepiece 0.2.3 on
        this project's 2-core machine, its batch call still spends one core's time.

        Args:
            texts: The texts.
            add_bos: Put the BOS id first in each.
            add_eos: Put the EOS id last in each.

        Returns:
            One list of ids per text.
        """
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=-1)

    def encode_continuations(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of texts that follow a newline, as they come out when encoding the whole text.

        SentencePiece puts a "▁" (space) before every text it encodes, so
        ``encode(a) + encode(b) != encode(a + b)``. Encoding ``"\\n" + b`` and cutting the
        newline's ids off gives b's ids exactly as in ``a + "\\n" + b`` when the newline is a
        boundary no piece crosses (:attr:`splits_at_newline`).

        Args:
            texts: Texts that each follow a newline.

        Returns:
            One list of ids per text, without BOS or EOS.
        """
        ids, offsets = self.encode_continuations_flat(texts)
        bounds = offsets.tolist()
        return [ids[a:b].tolist() for a, b in zip(bounds, bounds[1:])]

    def encode_continuations_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode_continuations` of all texts as one flat int32 array and offsets.

        Where spaces are boundaries too (:attr:`splits_at_spaces`, true for Llama 2), each
        distinct word is encoded once and the texts are assembled from their words: the same
        ids as encoding every text whole, with about a quarter of SentencePiece's work on
        English text (Alpaca 5k: 287k words, 37k distinct).

        Args:
            texts: Texts that each follow a newline.

        Returns:
            ``(ids, offsets)``: text i's ids are ``ids[offsets[i]:offsets[i + 1]]`` (int32;
            offsets int64, length ``len(texts) + 1``).
        """
        if not self.splits_at_spaces:
            cut = len(self._newline)
            encoded = self._sp.encode(["\n" + t for t in texts], num_threads=-1)
            return _flatten([ids[cut:] for ids in encoded])
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
        word_ids, word_offsets = _flatten(self._sp.encode(distinct, num_threads=-1))
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
    def splits_at_newline(self) -> bool:
        """True when no piece contains a newline, so text can be encoded in newline-cut parts.

        True for Llama 2, where "\\n" is always the byte piece <0x0A>.
        """
        no_piece_spans_newline = "\n" not in self._vocabulary
        return no_piece_spans_newline and self._newline[-1:] == [self._sp.piece_to_id("<0x0A>")]

    @cached_property
    def splits_at_spaces(self) -> bool:
        """True when text can also be encoded word by word, cut before each single space.

        That holds when no piece has a "▁" right after another character (pieces may start
        with "▁" or be runs of "▁", never span a word boundary), and normalisation only turns
        spaces into "▁" and adds one in front (no NFKC, no whitespace folding). Then BPE's
        merges never cross such a boundary and each word merges alone exactly as in the whole
        text. True for Llama 2.
        """
        probe = " a  b\t\u00a0c\u3000\uff46 \ufb01 e\u0301 \u2460\n "
        plain = self._sp.normalize(probe) == "\u2581" + probe.replace(" ", "\u2581")
        vocabulary = self._vocabulary
        separable = vocabulary.count("\0") == self._sp.get_piece_size() - 1  # no NUL in pieces
        return (
            plain
            and separable
            and self.splits_at_newline
            and _GLUED_SPACE.search(vocabulary) is None
        )

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (BOS, EOS and pad ids are dropped).

        Args:
            ids: Token ids.

        Returns:
            The text.
        """
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id, e.g. ``"▁Hello"`` or ``"<0x0A>"``."""
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Llama2Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# A "▁" after another character of the same piece: a piece that would span a word boundary.
_GLUED_SPACE = re.compile("[^\u2581\0]\u2581")


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as one flat int32 array and (N + 1,) int64 offsets."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)), out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def gather(
    source: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``source[starts[i]:starts[i] + lengths[i]]`` joined, and their (N + 1,) offsets.

    The ragged-array workhorse: one vectorised index instead of a Python loop over slices.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.arange(offsets[-1], dtype=np.int64)
    index += np.repeat(starts - offsets[:-1], lengths)
    return source[index], offsets
