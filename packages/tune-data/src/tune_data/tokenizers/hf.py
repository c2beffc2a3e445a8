"""Hugging Face tokenizers through the ``tokenizers`` library: a ``tokenizer.json`` (Qwen2 and
any family that ships one), or a byte-level BPE's ``vocab.json`` + ``merges.txt`` with the
added tokens its ``tokenizer_config.json`` lists (Qwen3 folders re-saved by transformers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tune_data.errors import DataError
from tune_data.tokenizers.base import (
    NEWLINE_SAFE_PATTERNS,
    QWEN2_PATTERN,
    Tokenizer,
    fingerprint,
    read_tokenizer_file,
    wrong_format,
)

# Special tokens that end a turn or a document in the families that ship a tokenizer.json;
# generation stops at any of them that the vocabulary has, besides EOS.
_END_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
    "<end_of_turn>", "</s>",
)

# The tokenizer classes whose vocab.json + merges.txt tune builds a tokenizer from, the way
# transformers' Qwen2Tokenizer does (Qwen2, Qwen2.5, Qwen3): NFC, Qwen2's split pattern,
# byte-level BPE without a prefix space. Other classes put other pipelines around their
# files; for those the model's tokenizer.json says which.
_VOCAB_MERGES_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
_VOCAB_FILES = ("vocab.json", "merges.txt")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, with the special ids of the files beside it.

    A folder without a ``tokenizer.json`` (or a path to its ``vocab.json``) is read from its
    ``vocab.json`` and ``merges.txt``, with the pipeline transformers' ``Qwen2Tokenizer``
    builds around them and the added tokens of ``tokenizer_config.json``'s
    ``added_tokens_decoder`` (else ``added_tokens.json``), each at its own id and with its
    own flags: Qwen3's 26, ``<|endoftext|>`` 151643 to ``</think>`` 151668, of which
    ``<think>``, ``</think>``, ``<tool_call>`` and the like are not special (they are read in
    text, as transformers reads them, and kept by ``decode``).

    * BOS: what the tokenizer's post-processor puts first (``<|begin_of_text|>`` for Llama 3),
      else ``bos_token`` if ``tokenizer_config.json`` says ``add_bos_token: true``, else None:
      Qwen2 has no BOS (its converted ``tokenizer_config.json`` names ``<|endoftext|>`` as
      bos_token, but transformers never adds it), so nothing is put first.
    * EOS and padding: ``eos_token`` and ``pad_token`` of ``tokenizer_config.json``
      (Qwen2: ``<|endoftext|>`` 151643 for both; Qwen2-Instruct's config says
      ``<|im_end|>`` for EOS); without that file, the post-processor's last token or a
      well-known end token; padding falls back to EOS.
    * Generation stops at EOS, the ids in ``generation_config.json``'s ``eos_token_id``, and
      the end-of-turn tokens the vocabulary has (``<|im_end|>``, ``<|endoftext|>``, ...).

    Special-token names in text are encoded as plain text (as Llama 3's tokenizer does), so
    data can never smuggle in a control token; chat formats add them by id.

    Args:
        path: The ``tokenizer.json`` file, its folder, or a ``vocab.json`` with
            ``merges.txt`` and ``tokenizer_config.json`` beside it.

    Raises:
        DataError: If the files are missing or damaged, are not a tokenizer.json, are
            vocab.json + merges.txt of a class tune cannot build, or name no end token.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        config = _read_json(folder / "tokenizer_config.json")
        if _reads_vocab_and_merges(path):
            self.path = folder / "vocab.json"
            tok, data = _from_vocab_and_merges(folder, config)
        else:
            self.path, data = read_tokenizer_file(path, "tokenizer.json", "hf")
            tok = _from_tokenizer_json(self.path, data)
        tok.encode_special_tokens = True
        self._tok = tok
        generation = _read_json(folder / "generation_config.json")
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        # Every id the tokenizer can produce: the model's vocabulary and the added tokens.
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=False),
                              max(added, default=-1) + 1)
        self.fingerprint = fingerprint("hf", data, json.dumps(config, sort_keys=True).encode(),
                                       json.dumps(generation, sort_keys=True).encode())

        prefix, suffix = _template_ends(tok)
        self.bos_id = prefix[0] if len(prefix) == 1 else None
        if self.bos_id is None and config.get("add_bos_token"):
            self.bos_id = self._named_id(config.get("bos_token"))
        eos = self._named_id(config.get("eos_token"))
        if eos is None and len(suffix) == 1:
            eos = suffix[0]
        if eos is None:
            eos = next((self.special_tokens[n] for n in _END_TOKENS if n in self.special_tokens),
                       None)
        if eos is None:
            raise DataError(
                f"{self.path} names no end-of-sequence token; put the model's "
                "tokenizer_config.json (with eos_token) beside it"
            )
        self.eos_id = eos
        pad = self._named_id(config.get("pad_token"))
        self.pad_id = pad if pad is not None else eos
        stops = [eos, *_as_list(generation.get("eos_token_id"))]
        stops += [self.special_tokens[n] for n in _END_TOKENS if n in self.special_tokens]
        self.stop_tokens = tuple(dict.fromkeys(int(i) for i in stops))
        self.cuts_after_newline = _cuts_after_newline(tok, added)

    def _named_id(self, token: Any) -> int | None:
        """The id of a token named in tokenizer_config.json (a string or {"content": ...})."""
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._with_ends(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[list[int]]:
        encoded = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._with_ends(e.ids, add_bos, add_eos) for e in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        return piece if piece is not None else f"<unknown id {int(token_id)}>"


def _reads_vocab_and_merges(path: Path) -> bool:
    """True when ``path`` names a vocab.json / merges.txt pair rather than a tokenizer.json:
    one of those files, or a folder that has them and no tokenizer.json."""
    if path.is_dir():
        return not (path / "tokenizer.json").is_file() and (path / "vocab.json").is_file()
    return path.name in _VOCAB_FILES


def _from_tokenizer_json(path: Path, data: bytes):
    import tokenizers  # here, so importing tune_data stays light

    try:
        return tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception:  # the Rust side raises Exception with serde's text
        raise wrong_format(path, "hf", None) from None


def _from_vocab_and_merges(folder: Path, config: dict):
    """A byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt`` as transformers'
    ``Qwen2Tokenizer`` builds it, with the added tokens of the files beside them; returns it
    and the bytes that identify it (for the fingerprint)."""
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers

    missing = [n for n in _VOCAB_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} has no tokenizer.json and no {missing[0]}; pass the "
                        "model's tokenizer.json, or the folder holding vocab.json and "
                        "merges.txt")
    kind = config.get("tokenizer_class")
    if kind not in _VOCAB_MERGES_CLASSES:
        said = (f"its tokenizer_config.json names tokenizer_class {kind!r}" if kind else
                "no tokenizer_config.json beside them says which tokenizer they are")
        raise DataError(
            f"{folder} holds vocab.json and merges.txt but no tokenizer.json, and {said}; "
            "tune builds a tokenizer from those two files for Qwen2Tokenizer (Qwen2, Qwen2.5, "
            "Qwen3) only: pass the model's tokenizer.json"
        )
    vocab, merges = (folder / n for n in _VOCAB_FILES)
    try:
        model = tokenizers.models.BPE.from_file(str(vocab), str(merges))
    except Exception:  # the Rust side raises Exception with its parser's text
        raise DataError(f"{vocab} and {merges} are not a BPE vocabulary and its merges "
                        "(damaged, truncated or another format); pass the files that came "
                        "with the model") from None
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    source, added = _added_tokens(folder, config)
    for token_id, token in added:
        # One at a time, in id order: tokenizers gives each the next free id, which must be
        # the one the files say (the model's embedding rows are in that order).
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(token.content) != token_id:
            raise DataError(
                f"{source} gives {token.content!r} the id {token_id}, but it lands at "
                f"{tok.token_to_id(token.content)} after the {tok.get_vocab_size(False):,} ids "
                f"of {vocab}: the files are of different tokenizers; pass the model's own "
                "files, or its tokenizer.json"
            )
    blobs = [vocab.read_bytes(), merges.read_bytes(),
             json.dumps([(i, t.content, t.special) for i, t in added]).encode()]
    return tok, b"".join(fingerprint("hf", b).encode() for b in blobs)


def _added_tokens(folder: Path, config: dict) -> tuple[Path, list[tuple[int, Any]]]:
    """The tokens added after a vocab.json's ids, by id: tokenizer_config.json's
    ``added_tokens_decoder`` (what transformers writes), else ``added_tokens.json`` (special
    where special_tokens_map.json names them). Returns the file they came from and them."""
    from tokenizers import AddedToken

    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        source = folder / "tokenizer_config.json"
        try:
            tokens = [(int(i), AddedToken(
                t["content"], single_word=bool(t.get("single_word", False)),
                lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                normalized=bool(t.get("normalized", not t.get("special", False))),
                special=bool(t.get("special", False)))) for i, t in decoder.items()]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"{source} has an added_tokens_decoder that is not "
                            "{id: {content, special, ...}}; fix it or pass the model's "
                            "tokenizer.json") from None
        return source, sorted(tokens, key=lambda t: t[0])
    source = folder / "added_tokens.json"
    named = _read_json(source)
    special_map = _read_json(folder / "special_tokens_map.json")
    special = {_content(v) for k, v in special_map.items() if k != "additional_special_tokens"}
    special |= {_content(v) for v in special_map.get("additional_special_tokens", [])}
    if not all(isinstance(i, int) for i in named.values()):
        raise DataError(f"{source} is not {{token: id}}; fix it or pass the model's "
                        "tokenizer.json")
    tokens = [(i, AddedToken(c, special=c in special, normalized=c not in special))
              for c, i in named.items()]
    return source, sorted(tokens, key=lambda t: t[0])


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; fix it or remove it") from None
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _template_ends(tok) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text (``add_special_tokens``)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _cuts_after_newline(tok, added: dict) -> bool:
    """True when the pipeline is one under which newline cuts are exact: byte-level BPE over
    one of :data:`NEWLINE_SAFE_PATTERNS`, no normaliser but NFC (which never composes a
    newline with what follows), and no text-matched added token that holds a newline or
    swallows the whitespace beside it."""
    try:
        pre = json.loads(tok.pre_tokenizer.__getstate__()) if tok.pre_tokenizer else {}
        norm = json.loads(tok.normalizer.__getstate__()) if tok.normalizer else None
    except (AttributeError, TypeError, ValueError):
        return False  # a pipeline this check cannot read is treated as unsafe (exact, slower)
    steps = pre.get("pretokenizers", [])
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return False
    split, byte_level = steps
    pattern = split.get("pattern", {}).get("Regex") if split.get("type") == "Split" else None
    return (
        type(tok.model).__name__ == "BPE"
        and (norm is None or norm.get("type") == "NFC")
        and pattern in NEWLINE_SAFE_PATTERNS
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("add_prefix_space")
        and not byte_level.get("use_regex")
        and not any(
            "\n" in t.content or t.lstrip or t.rstrip for t in added.values() if not t.special
        )
    )
