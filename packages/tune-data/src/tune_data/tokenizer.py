"""The Llama 2 tokenizer: a thin, typed wrapper around a SentencePiece model."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

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
        """Token ids of many texts, encoded on all CPU cores by SentencePiece's thread pool.

        Args:
            texts: The texts.
            add_bos: Put the BOS id first in each.
            add_eos: Put the EOS id last in each.

        Returns:
            One list of ids per text.
        """
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=-1)

    def encode_continuations(self, texts: list[str]) -> list[list[int]]:
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
        cut = len(self._newline)
        encoded = self._sp.encode(["\n" + t for t in texts], num_threads=-1)
        return [ids[cut:] for ids in encoded]

    @cached_property
    def splits_at_newline(self) -> bool:
        """True when no piece contains a newline, so text can be encoded in newline-cut parts.

        True for Llama 2, where "\\n" is always the byte piece <0x0A>.
        """
        sp = self._sp
        pieces = sp.id_to_piece(list(range(sp.get_piece_size())))
        no_piece_spans_newline = not any("\n" in piece for piece in pieces)
        return no_piece_spans_newline and self._newline[-1:] == [sp.piece_to_id("<0x0A>")]

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
