"""Tokenizers behind one interface (:class:`Tokenizer`), and :func:`load_tokenizer`, which
picks the implementation from the file."""

from __future__ import annotations

from pathlib import Path

from tune_data.errors import DataError
from tune_data.tokenizers.base import Tokenizer, sniff
from tune_data.tokenizers.hf import HFTokenizer
from tune_data.tokenizers.llama3 import Llama3Tokenizer
from tune_data.tokenizers.sentencepiece import Llama2Tokenizer, SentencePieceTokenizer

# Implementation by file format ("kind").
TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {
    "sentencepiece": SentencePieceTokenizer,
    "tiktoken": Llama3Tokenizer,
    "hf": HFTokenizer,
}


def load_tokenizer(path: str | Path, kind: str | None = None) -> Tokenizer:
    """The tokenizer in a file, its implementation picked by the file's contents.

    A ``tokenizer.json`` is read with :class:`HFTokenizer`, a tiktoken BPE file (Llama 3's
    ``tokenizer.model``) with :class:`Llama3Tokenizer`, anything else as a SentencePiece model
    (:class:`SentencePieceTokenizer`). A folder means its ``tokenizer.model``, else its
    ``tokenizer.json``.

    Args:
        path: The tokenizer file or its folder.
        kind: Force an implementation: "sentencepiece", "tiktoken" or "hf".

    Returns:
        The tokenizer.

    Raises:
        DataError: If nothing loadable is there, or the file is not of ``kind``.
    """
    path = Path(path)
    if kind is not None and kind not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r}; choose from "
                        f"{', '.join(TOKENIZER_KINDS)}")
    if path.is_dir():
        found = [path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).is_file()]
        if not found:
            raise DataError(f"{path} holds no tokenizer.model or tokenizer.json; pass the "
                            "tokenizer file that came with the model")
        path = found[0]
    if kind is None:
        if not path.is_file():
            raise DataError(f"tokenizer file {path} not found; pass the tokenizer.model or "
                            "tokenizer.json that came with the model")
        with path.open("rb") as f:
            kind = sniff(f.read(4096))
        if kind in (None, "sentencepiece"):
            try:
                return SentencePieceTokenizer(path)
            except DataError:
                raise DataError(
                    f"{path} is not a tokenizer file tune reads (a SentencePiece or Llama 3 "
                    "tokenizer.model, or a Hugging Face tokenizer.json), or it is damaged"
                ) from None
    return TOKENIZER_KINDS[kind](path)


__all__ = [
    "HFTokenizer", "Llama2Tokenizer", "Llama3Tokenizer", "SentencePieceTokenizer",
    "TOKENIZER_KINDS", "Tokenizer", "load_tokenizer",
]
