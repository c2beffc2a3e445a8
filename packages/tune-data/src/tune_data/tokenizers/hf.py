"""Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (Qwen2 and any family
that ships one)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tune_data.errors import DataError
from tune_data.tokenizers.base import (
    NEWLINE_SAFE_PATTERNS,
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


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, with the special ids of the files beside it.

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
        path: The ``tokenizer.json`` file, or its folder.

    Raises:
        DataError: If the file is missing, is not a tokenizer.json, or has no end token.
    """

    def __init__(self, path: str | Path):
        import tokenizers  # here, so importing tune_data stays light

        self.path, data = read_tokenizer_file(path, "tokenizer.json", "hf")
        try:
            tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception:  # the Rust side raises Exception with serde's text
            raise wrong_format(self.path, "hf", None) from None
        tok.encode_special_tokens = True
        self._tok = tok
        config = _read_json(self.path.parent / "tokenizer_config.json")
        generation = _read_json(self.path.parent / "generation_config.json")
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
