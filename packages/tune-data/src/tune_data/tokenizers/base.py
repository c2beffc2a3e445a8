"""The tokenizer interface: everything datasets, generation and evaluation may ask of one.

Each implementation lives in its own file and is the only code that touches its library:
SentencePiece (Llama 2, Mistral), Meta's tiktoken file (Llama 3) and Hugging Face's
``tokenizer.json`` (Qwen2 and any family that ships one).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tune_data.errors import DataError
from tune_data.ragged import flatten


class Tokenizer(ABC):
    """Text to ids and back, with the family's special tokens.

    Attributes:
        path: The file it was loaded from.
        vocab_size: How many ids it can produce (its largest id + 1, special tokens
            included): a model's embedding needs at least this many rows.
        bos_id: Put first by ``encode(add_bos=True)``; None where the family has no BOS
            (Qwen2), and then nothing is put first.
        eos_id: Ends every training sample.
        pad_id: Fills batches; padded positions take no loss, so any valid id would do.
        special_tokens: Every special (control) token by name, e.g. ``"<|eot_id|>"``; never
            produced by encoding text.
        stop_tokens: Ids that end generation: EOS and the family's end-of-turn tokens.
        fingerprint: Changes whenever the ids could; part of dataset cache keys.
    """

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]
    stop_tokens: tuple[int, ...]
    fingerprint: str

    #: True when a text cut just after a newline whose next character is not whitespace
    #: encodes part by part (the first with :meth:`encode`, the others with
    #: :meth:`encode_after_newline`) exactly as it does whole. Datasets then tokenise a
    #: template's fixed text once and only the records' own fields each time; where False
    #: they encode every text whole.
    cuts_after_newline: bool = False

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of one text. Special-token names in the text are plain text.

        Args:
            text: The text.
            add_bos: Put BOS first (where the family has one).
            add_eos: Put EOS last.

        Returns:
            The ids.
        """

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[list[int]]:
        """:meth:`encode` of many texts (implementations batch the library call).

        Args:
            texts: The texts.
            add_bos: Put BOS first in each (where the family has one).
            add_eos: Put EOS last in each.

        Returns:
            One list of ids per text.
        """
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode` of many texts without BOS, as one flat array (what datasets use).

        Args:
            texts: The texts.

        Returns:
            ``(ids, offsets)``: text i's ids are ``ids[offsets[i]:offsets[i + 1]]`` (int32;
            offsets int64, length ``len(texts) + 1``).
        """
        return flatten(self.encode_batch(texts, add_bos=False))

    def encode_after_newline(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of texts that each follow a cut (see :attr:`cuts_after_newline`), as they come
        out inside the whole text.

        Only meaningful where :attr:`cuts_after_newline` is True. The default encodes each
        text alone, which is right for tokenizers that add nothing at the start of a text.

        Args:
            texts: Texts that each follow a newline; each starts with a character that is
                not whitespace, or is the end of the whole text.

        Returns:
            ``(ids, offsets)``: text i's ids are ``ids[offsets[i]:offsets[i + 1]]`` (int32;
            offsets int64, length ``len(texts) + 1``).
        """
        return flatten(self.encode_batch(texts, add_bos=False))

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; special tokens are left out.

        Args:
            ids: Token ids.

        Returns:
            The text.
        """

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Text of ids that continue a text rather than start it.

        Some tokenizers drop a space at the start of a decoded text (SentencePiece's dummy
        prefix); this keeps it, so a sample can be shown piece by piece.
        """
        return self.decode(ids)

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary's entry for one id, e.g. ``"▁Hello"`` or ``"<|eot_id|>"``."""

    def token_id(self, name: str) -> int:
        """The id of a special token, by name.

        Raises:
            DataError: If the tokenizer has no such token.
        """
        if name in self.special_tokens:
            return self.special_tokens[name]
        named = sorted(n for n in self.special_tokens if "reserved" not in n)
        raise DataError(
            f"{self.path} has no special token {name!r}; it has {', '.join(named[:12])}"
            + (", ..." if len(named) > 12 else "")
        )

    def _with_ends(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


# Pre-tokenizer patterns (byte-level BPE) under which a text cut just after a newline whose
# next character is not whitespace encodes part by part exactly as whole. Every alternative
# that can match a newline ends at the last newline of a run or at whitespace:
# ` ?[^\s\p{L}\p{N}]+[\r\n]*` (punctuation takes the newlines after it), `\s*[\r\n]+`, and
# the whitespace runs; none reaches past a newline into the next non-whitespace character,
# and `\s*[\r\n]+` is tried before `\s+(?!\S)`, so what follows the cut cannot change how
# the text before it splits (GPT-2's pattern lacks that order and is not on this list). The
# next match starts at the cut both in the whole text and alone, and BPE merges stay inside a
# match. Llama 3's is Meta's; Qwen2's differs only in taking single digits.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
NEWLINE_SAFE_PATTERNS = frozenset({LLAMA3_PATTERN, QWEN2_PATTERN})

# What each file format ("kind", as load_tokenizer names them) is called in messages, and
# the file of that kind a model ships. Messages name files and kinds only: which setting of a
# caller picks the kind is the caller's to say.
FORMATS = {
    "sentencepiece": ("a SentencePiece model", "a SentencePiece tokenizer.model"),
    "tiktoken": ("a tiktoken BPE file (Llama 3's tokenizer.model)",
                 "Llama 3's tiktoken tokenizer.model"),
    "hf": ("a Hugging Face tokenizer.json", "a tokenizer.json"),
}

# A tiktoken BPE file: one "base64-bytes rank" pair per line.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def sniff(data: bytes) -> str | None:
    """The likely format of a tokenizer file by its first bytes ("hf", "tiktoken",
    "sentencepiece"), or None."""
    head = data[:4096]
    if head.lstrip()[:1] == b"{":
        return "hf"
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if _TIKTOKEN_LINE.fullmatch(first):
        return "tiktoken"
    if head[:1] == b"\n":  # protobuf: field 1 (the pieces), length-delimited
        return "sentencepiece"
    return None


def read_tokenizer_file(path: str | Path, file_name: str, kind: str) -> tuple[Path, bytes]:
    """The bytes of a tokenizer file (``path`` or ``path/file_name`` for a folder).

    Raises:
        DataError: If the file is missing, or is plainly of another format than ``kind``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise DataError(
            f"tokenizer file {path} not found; pass the {file_name} that came with the model"
        )
    data = path.read_bytes()
    found = sniff(data)
    if found is not None and found != kind:
        raise wrong_format(path, kind, found)
    return path, data


def wrong_format(path: Path, kind: str, found: str | None) -> DataError:
    """The one-line error for a file that is not of the expected format."""
    expected = FORMATS[kind][0]
    if found is None:
        return DataError(
            f"{path} is not {expected} (damaged, truncated or another format); pass the "
            "tokenizer file that came with the model"
        )
    what = FORMATS[found][0]
    return DataError(f"{path} is {what}, not {expected}: read it as kind '{found}', or pass "
                     f"{FORMATS[kind][1]}")


def fingerprint(kind: str, *blobs: bytes) -> str:
    """A short hash of the implementation and its files, for cache keys."""
    digest = hashlib.sha256(kind.encode())
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()[:16]
