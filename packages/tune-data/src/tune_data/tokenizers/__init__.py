"""Tokenizers behind one interface (:class:`Tokenizer`), the kinds of file they read
(:data:`TOKENIZER_KINDS`, the one vocabulary of tokenizer kinds: model families name theirs
with it), and :func:`load_tokenizer`, which picks the implementation from the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune_data.errors import DataError
from tune_data.tokenizers.base import Tokenizer, sniff
from tune_data.tokenizers.hf import HFTokenizer
from tune_data.tokenizers.llama3 import Llama3Tokenizer
from tune_data.tokenizers.sentencepiece import Llama2Tokenizer, SentencePieceTokenizer


@dataclass(frozen=True)
class TokenizerKind:
    """A kind of tokenizer file: the class that reads it and the file in words (messages).

    Attributes:
        name: The kind's name ("sentencepiece", "tiktoken", "hf").
        reader: The :class:`Tokenizer` class that reads it.
        file: The file, in words, e.g. "a SentencePiece tokenizer.model".
    """

    name: str
    reader: type[Tokenizer]
    file: str


# Every kind of file tune reads, by name: what sniff() tells, load_tokenizer(kind=...) takes
# and tune_models.ModelFamily.tokenizer names.
TOKENIZER_KINDS: dict[str, TokenizerKind] = {
    kind.name: kind for kind in (
        TokenizerKind("sentencepiece", SentencePieceTokenizer, "a SentencePiece tokenizer.model"),
        TokenizerKind("tiktoken", Llama3Tokenizer,
                      "a Llama 3 tiktoken tokenizer.model (original/tokenizer.model on the Hub)"),
        TokenizerKind("hf", HFTokenizer, "a Hugging Face tokenizer.json"),
    )
}


def kind_of(tokenizer_class: type) -> TokenizerKind:
    """The kind a tokenizer class reads (a subclass reads its base's kind)."""
    return next(k for k in TOKENIZER_KINDS.values() if issubclass(tokenizer_class, k.reader))


def load_tokenizer(path: str | Path, kind: str | None = None) -> Tokenizer:
    """The tokenizer in a file, its implementation picked by the file's contents.

    A ``tokenizer.json`` is read with :class:`HFTokenizer`, a tiktoken BPE file (Llama 3's
    ``tokenizer.model``) with :class:`Llama3Tokenizer`, anything else as a SentencePiece model
    (:class:`SentencePieceTokenizer`). A folder means its ``tokenizer.model``, else its
    ``tokenizer.json``, else its ``vocab.json`` + ``merges.txt`` (read by
    :class:`HFTokenizer`, as is a path to that ``vocab.json``).

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
        found = [path / n for n in ("tokenizer.model", "tokenizer.json", "vocab.json")
                 if (path / n).is_file()]
        if not found:
            raise DataError(f"{path} holds no tokenizer.model, tokenizer.json or vocab.json; "
                            "pass the tokenizer file that came with the model")
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
    return TOKENIZER_KINDS[kind].reader(path)


__all__ = [
    "HFTokenizer", "Llama2Tokenizer", "Llama3Tokenizer", "SentencePieceTokenizer",
    "TOKENIZER_KINDS", "Tokenizer", "TokenizerKind", "kind_of", "load_tokenizer",
]
