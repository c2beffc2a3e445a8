"""Chat datasets: conversations with any number of turns, every assistant turn trained.

Conversations come in OpenAI style (``{"messages": [{"role", "content"}, ...]}``) or
ShareGPT style (``{"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}``),
from local json / jsonl / parquet files or the Hub. A chat template
(:mod:`tune_data.chat_templates`) turns each into text and control tokens;
:func:`encode_pieces` tokenises them so the ids equal those of the whole rendered text
(transformers' ``apply_chat_template(tokenize=True)`` for the same template and tokenizer),
and the loss mask covers every assistant turn with the token that ends it.

Speed, measured in ``benchmarks/data.py``: local JSON is read with the json module and the
result cached in one Arrow file (as for instruction data); all of a batch's texts go through
the tokenizer in one call (SentencePiece: each distinct text, then each distinct word, once),
and texts that may be cut where a trained span starts (just after a newline, or for
SentencePiece before a single space) are encoded in parts instead of twice.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tune_data import cache
from tune_data.chat_templates import (
    ChatTemplate,
    JinjaChatTemplate,
    Message,
    Piece,
    load_chat_template,
)
from tune_data.dataset import ROLES, TokenizedArrays, TokenizedDataset, Turns
from tune_data.errors import DataError
from tune_data.instruct import (
    _describe_source,
    _encode_all,
    _raise_json_syntax,
    _tokenize_records,
)
from tune_data.ragged import flatten, gather
from tune_data.sources import (
    DataFiles,
    _json_records,
    check_source,
    load_records,
    local_json_files,
)
from tune_data.tokenizers import Tokenizer

# Bump when the tokenisation below changes, so stale cached datasets are not reused.
_FORMAT_VERSION = "chat-1"
_MAP_BATCH = 1024

# Role names in the data -> the roles templates know. ShareGPT writes human / gpt.
ROLE_NAMES = {
    "system": "system", "user": "user", "assistant": "assistant",
    "human": "user", "gpt": "assistant",
}
CONVERSATION_COLUMNS = ("messages", "conversations")  # OpenAI style, ShareGPT style
_ROLE_CODES = {role: code for code, role in enumerate(ROLES)}


def normalize_messages(
    conversation: Any, role_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> list[Message]:
    """One conversation as ``[{"role": system|user|assistant, "content": str}, ...]``.

    Args:
        conversation: A list of OpenAI-style (``role``/``content``) or ShareGPT-style
            (``from``/``value``) messages.
        role_map: Extra role names, e.g. ``{"bot": "assistant"}`` (beside
            :data:`ROLE_NAMES`).
        system_prompt: Put first as a system message when the conversation has none.

    Returns:
        The messages.

    Raises:
        DataError: For an unknown role, a missing or empty content, or no messages (one
            line without the row; the dataset adds it).
    """
    return _normalize(conversation, {**ROLE_NAMES, **(role_map or {})}, system_prompt)


def _normalize(conversation: Any, names: Mapping[str, str], system_prompt: str | None
               ) -> list[Message]:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise DataError("has no messages (expected a list of {role, content} or "
                        "{from, value} objects)")
    messages = []
    for k, message in enumerate(conversation):
        if type(message) is not dict and not isinstance(message, Mapping):
            raise DataError(f"message {k} is not an object with a role and a content")
        role = message.get("role")
        if role is None and "from" in message:  # ShareGPT
            role, content = message.get("from"), message.get("value")
        else:
            content = message.get("content")
        name = names.get(role) if isinstance(role, str) else None
        if name not in ROLES:
            known = ", ".join(sorted(names))
            raise DataError(f"message {k} has the unknown role {role!r} (known: {known}); "
                            "map it with role_map={" + repr(role) + ": 'assistant'} or fix it")
        if type(content) is not str or not content or content.isspace():
            what = "an empty content" if isinstance(content, str) or content is None \
                else f"a content that is not text ({type(content).__name__})"
            raise DataError(f"message {k} ({name}) has {what}; fill it in or remove the row")
        messages.append({"role": name, "content": content})
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


# --------------------------------------------------------------------------- tokenising
def _safe_cut(tokenizer: Tokenizer, before: str, after: str) -> bool:
    """True when ``before + after`` encodes as ``before`` alone followed by ``after``
    through :meth:`Tokenizer.encode_after_newline`: just after a newline followed by a
    character that is not whitespace (:attr:`Tokenizer.cuts_after_newline`), or, where
    spaces are boundaries too (SentencePiece's ``splits_at_spaces``: Llama 2, Mistral),
    before a single space that follows a character that is not one."""
    if not before or not after:
        return False
    if before[-1] == "\n" and not after[0].isspace():
        return tokenizer.cuts_after_newline
    if after[0] == " " and before[-1] not in " \u2581":
        return tokenizer.cuts_after_newline and getattr(tokenizer, "splits_at_spaces", False)
    return False


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. Tokenising makes many small objects that
    never form cycles (messages, pieces); with the collector on, each burst of them sets
    off collections that rescan every object alive, the loaded records included: a third
    of the time for 5,000 conversations."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class MessageStarts(NamedTuple):
    """Where each message's first token is: ``positions[offsets[i]:offsets[i + 1]]`` within
    conversation i, for the messages ``messages[offsets[i]:offsets[i + 1]]`` (indices)."""

    positions: np.ndarray
    messages: np.ndarray
    offsets: np.ndarray


def encode_pieces(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[Piece]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, MessageStarts]:
    """Token ids of rendered conversations, with the trained mask and message starts.

    Text between control tokens is one text, encoded as a whole would be: parts cut where
    :func:`_safe_cut` allows are encoded apart (that is exact; the built-in formats cut
    only there with the tokenizers of their families), other cuts are placed where the
    encodings of the text and of its part before the cut stop agreeing (a token that spans
    the cut goes with the part after it).

    Args:
        tokenizer: The tokenizer.
        conversations: Each conversation's pieces (:meth:`ChatTemplate.pieces`).

    Returns:
        ``(tokens, offsets, trained, starts)``: flat int32 ids, (N + 1,) offsets, flat bool
        (token j lies in a trained span), and where each message starts.
    """
    # 1. Every non-empty piece is a segment, whose tokens take its trained flag and message;
    #    a control token is one. Text pieces make texts, what the tokenizer encodes in one
    #    go: a piece starts a text, or, where the cut before it is not one the tokenizer can
    #    make exactly, joins the text before it (that text's later pieces are placed in its
    #    ids once it is encoded).
    texts: list[str] = []
    after_cut: list[bool] = []  # per text: it follows a safe cut (else it starts a text)
    cuts: dict[int, tuple[int, list[int]]] = {}  # text -> (its first segment, where in its
    #                                              characters each later piece begins)
    controls: list[int] = []  # the control tokens' ids, in order
    segment_text: list[int] = []  # per segment: its text, or -1 for a control token
    segment_trained: list[bool] = []
    segment_message: list[int] = []
    segments_per_conversation: list[int] = []
    for pieces in conversations:
        before = len(segment_text)
        text = -1  # the text the next piece may continue; -1: none (start, control token)
        for value, trained, message, new_text in pieces:
            if value.__class__ is int:
                controls.append(value)
                text = -1
            elif not value:
                continue
            elif text < 0 or new_text or _safe_cut(tokenizer, texts[text], value):
                after_cut.append(text >= 0 and not new_text)
                text = len(texts)
                texts.append(value)
            else:  # joins the text; its first segment is the last one so far
                cuts.setdefault(text, (len(segment_text) - 1, []))[1].append(len(texts[text]))
                texts[text] += value
            segment_text.append(text)
            segment_trained.append(trained)
            segment_message.append(message)
        segments_per_conversation.append(len(segment_text) - before)

    # 2. Encode the texts, and each text with cuts up to each of its cuts (after them, in
    #    the order of ``cuts``); then the control tokens follow in the same flat array.
    prefixes = range(len(texts), len(texts) + sum(len(c) for _, c in cuts.values()))
    for t, (_, characters) in cuts.items():
        texts += [texts[t][:c] for c in characters]
        after_cut += [after_cut[t]] * len(characters)
    source, text_start, text_len = _encode_texts(tokenizer, texts, after_cut)
    source = np.concatenate([source, np.asarray(controls, dtype=np.int32)])

    # 3. Where each segment's ids lie in ``source``: its text's, or its control token's; a
    #    text with cuts is shared out among its segments.
    text_of = np.asarray(segment_text, dtype=np.int64)
    is_text = text_of >= 0
    start = np.empty(len(text_of), dtype=np.int64)
    length = np.ones(len(text_of), dtype=np.int64)
    start[is_text], length[is_text] = text_start[text_of[is_text]], text_len[text_of[is_text]]
    start[~is_text] = len(source) - len(controls) + np.arange(len(controls))

    def ids_of(t: int) -> np.ndarray:
        return source[text_start[t] : text_start[t] + text_len[t]]

    prefix = iter(prefixes)
    for t, (first, characters) in cuts.items():
        bounds = _part_bounds(ids_of(t), [ids_of(next(prefix)) for _ in characters])
        parts = slice(first, first + len(bounds) - 1)
        start[parts], length[parts] = text_start[t] + bounds[:-1], np.diff(bounds)

    tokens, _ = gather(source, start, length)
    trained = np.repeat(np.asarray(segment_trained, dtype=bool), length)
    conv = np.repeat(np.arange(len(segments_per_conversation)), segments_per_conversation)
    lengths = np.bincount(conv, weights=length, minlength=len(segments_per_conversation))
    offsets = np.zeros(len(segments_per_conversation) + 1, dtype=np.int64)
    np.cumsum(lengths.astype(np.int64), out=offsets[1:])
    return tokens.astype(np.int32, copy=False), offsets, trained, _message_starts(
        conv, np.asarray(segment_message, dtype=np.int64), length, offsets)


def _encode_texts(tokenizer: Tokenizer, texts: list[str], after_cut: list[bool]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts encoded as a text's start (:meth:`Tokenizer.encode_flat`) or, where
    ``after_cut``, as following a safe cut (:meth:`Tokenizer.encode_after_newline`), in two
    batch calls: one flat int32 array, text i's ids at ``[start[i], start[i] + length[i])``."""
    follows = np.asarray(after_cut, dtype=bool)
    start = np.empty(len(texts), dtype=np.int64)
    length = np.empty(len(texts), dtype=np.int64)
    ids, at = tokenizer.encode_flat([t for t, f in zip(texts, after_cut) if not f])
    start[~follows], length[~follows] = at[:-1], np.diff(at)
    if not follows.any():
        return ids, start, length
    ids_after, at = tokenizer.encode_after_newline([t for t, f in zip(texts, after_cut) if f])
    start[follows], length[follows] = len(ids) + at[:-1], np.diff(at)
    return np.concatenate([ids, ids_after]), start, length


def _part_bounds(whole: np.ndarray, prefixes: list[np.ndarray]) -> np.ndarray:
    """Where each part of a text begins in the text's ids, and its end, given the ids of the
    text up to each cut: where those stop agreeing with the whole's (a token that spans the
    cut goes with the part after it), never before the part before."""
    bounds = [0]
    for prefix in prefixes:
        bounds.append(max(bounds[-1], _common_prefix(prefix, whole)))
    bounds.append(len(whole))
    return np.array(bounds, dtype=np.int64)


def _message_starts(conv: np.ndarray, message: np.ndarray, seg_len: np.ndarray,
                    offsets: np.ndarray) -> MessageStarts:
    """Where each message's first token is, per conversation."""
    position = np.cumsum(seg_len) - seg_len - offsets[conv]  # segment start within its sample
    real = (seg_len > 0) & (message >= 0)
    conv, message, position = conv[real], message[real], position[real]
    # The first segment of each (conversation, message), in order: segments are in order.
    first = np.ones(len(conv), dtype=bool)
    first[1:] = (conv[1:] != conv[:-1]) | (message[1:] != message[:-1])
    conv, message, position = conv[first], message[first], position[first]
    turn_offsets = np.zeros(len(offsets), dtype=np.int64)
    np.cumsum(np.bincount(conv, minlength=len(offsets) - 1), out=turn_offsets[1:])
    return MessageStarts(position.astype(np.int32), message, turn_offsets)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def chat_prompt(
    tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message]
) -> list[int]:
    """Token ids that prompt a model for the next assistant turn of a conversation.

    Args:
        tokenizer: The model's tokenizer.
        template: The chat template the model was trained with.
        messages: The conversation so far (ending with a user turn).

    Returns:
        The ids, ending with the template's generation prompt.
    """
    pieces = template.pieces(messages, tokenizer, add_generation_prompt=True)
    tokens, _, _, _ = encode_pieces(tokenizer, [pieces])
    return tokens.tolist()


# --------------------------------------------------------------------------- the dataset
class _ChatEncoder:
    """Turns a batch of conversations into tokens, loss masks and message starts."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, *, train_on_input: bool,
                 max_seq_len: int | None, system_prompt: str | None,
                 role_map: Mapping[str, str] | None, where: str):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on_input = train_on_input
        self.max_seq_len = max_seq_len
        self.system_prompt = system_prompt
        self.names = {**ROLE_NAMES, **(role_map or {})}
        self.where = where

    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int]):
        """For ``datasets.map(batched=True, with_indices=True)``: the batch as an Arrow table."""
        return self.encode(batch, np.asarray(indices, dtype=np.int64)).to_arrow()

    def encode(self, batch: Mapping[str, Sequence[Any]], rows: np.ndarray) -> TokenizedArrays:
        """Tokenise one batch; ``batch`` has one column of conversations, ``rows`` numbers
        them."""
        with _collector_paused():
            return self._encode(batch, rows)

    def _encode(self, batch: Mapping[str, Sequence[Any]], rows: np.ndarray) -> TokenizedArrays:
        ((column, conversations),) = batch.items()
        all_pieces, all_roles = [], []
        for row, conversation in zip(rows.tolist(), conversations):
            try:
                if conversation is None:
                    raise DataError(f"has no '{column}'; fill it in or remove the row")
                messages = _normalize(conversation, self.names, self.system_prompt)
                all_pieces.append(self.template.pieces(messages, self.tokenizer))
            except DataError as e:
                raise DataError(f"{self.where}: row {row} (counting from 0): {e}") from None
            all_roles.append([_ROLE_CODES[m["role"]] for m in messages])
        tokens, offsets, assistant, starts = encode_pieces(self.tokenizer, all_pieces)
        return self._truncate(tokens, offsets, assistant, starts, all_roles, rows)

    def _truncate(self, tokens, offsets, assistant, starts: MessageStarts, all_roles, rows):
        """Conversations longer than max_seq_len cut there, the mask kept as it was; one
        left without any trained token is dropped (counted by describe())."""
        lengths = np.diff(offsets)
        limit = self.max_seq_len
        kept_len = lengths if limit is None else np.minimum(lengths, limit)
        truncated = kept_len < lengths
        keep = np.ones(len(rows), dtype=bool)
        if truncated.any():
            # Assistant tokens that stay targets: positions 1 .. limit - 1 of the sample.
            counts = np.zeros(len(assistant) + 1, dtype=np.int64)
            np.cumsum(assistant, out=counts[1:])
            first = offsets[:-1]
            left = counts[first + kept_len] - counts[np.minimum(first + 1, first + kept_len)]
            keep = ~truncated | (left > 0)
            tokens, offsets = gather(tokens, first[keep], kept_len[keep])
            assistant, _ = gather(assistant, first[keep], kept_len[keep])
        trained = np.ones(len(tokens), dtype=bool) if self.train_on_input else assistant
        # Message indices -> roles; messages past the cut (or a generation prompt) go.
        role_codes, role_offsets = flatten(all_roles)
        conv = np.repeat(np.arange(len(rows)), np.diff(starts.offsets))
        index = starts.messages
        placed = (keep[conv] & (index < np.diff(role_offsets)[conv])
                  & (starts.positions < kept_len[conv]))
        conv = conv[placed]
        roles = role_codes[role_offsets[conv] + index[placed]].astype(np.int8)
        renumber = np.cumsum(keep) - 1  # conversation -> sample
        turn_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(np.bincount(renumber[conv], minlength=len(turn_offsets) - 1),
                  out=turn_offsets[1:])
        kept_turns = Turns(starts.positions[placed], roles, turn_offsets)
        return TokenizedArrays(tokens, offsets, trained, rows[keep], truncated[keep],
                               kept_turns)


def chat_dataset(
    tokenizer: Tokenizer,
    source: str | None = None,
    data_files: DataFiles | None = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = 512,
    *,
    chat_template: str | Path | ChatTemplate | None = None,
    conversation_column: str | None = None,
    system_prompt: str | None = None,
    role_map: Mapping[str, str] | None = None,
    enable_thinking: bool | None = None,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> TokenizedDataset:
    """Conversations, templated, tokenised and masked: every assistant turn is trained.

    Each record holds one conversation, OpenAI style (``messages: [{role, content}]``) or
    ShareGPT style (``conversations: [{from, value}]``, human -> user, gpt -> assistant),
    with an optional system message first and any number of turns. Loss is taken on every
    assistant turn, including the token that ends it (``</s>``, ``<|eot_id|>``,
    ``<|im_end|>``), never on system or user turns unless ``train_on_input``. A
    conversation longer than ``max_seq_len`` is cut there (a turn cut in the middle keeps
    its mask, without an end token); one left with no assistant token is dropped. Both are
    counted by :func:`tune_data.describe`.

    Args:
        tokenizer: The model's tokenizer.
        source: Hub dataset name, local file, or builder name (see
            :func:`tune_data.sources.load_records`); None to read ``data_files``.
        data_files: Local json / jsonl / parquet file(s).
        split: Split to load.
        train_on_input: Take the loss on system and user turns (and the template's text)
            as well.
        max_seq_len: Longest sample in tokens (None: no limit).
        chat_template: ``llama2``, ``llama3``, ``chatml``, ``mistral``, a ``.jinja`` file, a
            ``tokenizer_config.json`` holding ``chat_template``, a ChatTemplate, or None for
            the model's own, else the one its tokenizer tells
            (:func:`tune_data.chat_templates.default_chat_template`). A ``dataset: chat``
            config passes its model family's format instead of that guess
            (``tune_train.registry.chat_template``).
        conversation_column: The column holding the conversations (default: ``messages``
            or ``conversations``, whichever the data has).
        system_prompt: A system message for conversations that have none.
        role_map: More role names, e.g. ``{"bot": "assistant"}``.
        enable_thinking: Passed to a template that reads it: Qwen3's own template with
            False writes an empty think block into each answer's prompt, so the answers are
            trained without reasoning; None (the default) passes nothing. A template without
            that switch (every built-in one) refuses it.
        cache_dir: Cache folder.
        **load_kwargs: Passed on to ``datasets.load_dataset``.

    Returns:
        The dataset; ``dataset[i]`` is ``{"tokens", "labels"}``, ``dataset.turns`` says where
        each message starts.

    Raises:
        DataError: If the data cannot be loaded, or a row has an unknown role, an empty
            message, turns its template cannot hold, or makes the template fail: one line
            naming the row.
    """
    source = check_source("a chat dataset", source, data_files, max_seq_len)
    template = load_chat_template(chat_template, tokenizer, enable_thinking=enable_thinking)
    where = _describe_source(source, data_files)
    encoder = _ChatEncoder(tokenizer, template, train_on_input=train_on_input,
                           max_seq_len=max_seq_len, system_prompt=system_prompt,
                           role_map=role_map, where=where)
    settings = (
        tokenizer.fingerprint, _template_key(template), train_on_input, max_seq_len,
        system_prompt, sorted((role_map or {}).items()),
    )
    files = local_json_files(source, data_files, split, load_kwargs)
    if files is not None:
        built = _from_json_files(files, conversation_column, encoder, settings, where, cache_dir)
        if built is not None:
            return built
    records = load_records(source, data_files, split, cache_dir, **load_kwargs)
    column = _conversation_column(records.column_names, conversation_column, where)
    records = records.select_columns([column])
    return _tokenize_records(
        records, encoder, (_FORMAT_VERSION, column, *settings), tokenizer, max_seq_len, where,
        short_name=data_files is not None, batch_size=_MAP_BATCH, turns=True,
    )


def _template_key(template: ChatTemplate) -> str:
    """What identifies a template's output in cache keys."""
    if isinstance(template, JinjaChatTemplate):
        digest = hashlib.sha256(template.source.encode()).hexdigest()
        return f"jinja:{digest}:{template.enable_thinking}"
    return f"{type(template).__name__}:{template.name}"


def _conversation_column(columns: Sequence[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        found = None
    else:
        found = next((c for c in CONVERSATION_COLUMNS if c in columns), None)
    if found is None:
        have = ", ".join(columns) or "none"
        named = f"'{wanted}'" if wanted else "'messages' or 'conversations'"
        raise DataError(f"{where}: row 0 has no {named} column (columns: {have}); name the "
                        "column that holds the conversations with conversation_column=...")
    return found


def _from_json_files(
    files: list[Path], column: str | None, encoder: _ChatEncoder, settings: tuple, where: str,
    cache_dir: str | Path | None,
) -> TokenizedDataset | None:
    """Local JSON read with the json module and tokenised, cached in our own Arrow file;
    None when the files are not plain JSON arrays / lines of objects (datasets then reads
    them, and says what is wrong)."""
    blobs = [f.read_bytes() for f in files]
    key = repr((_FORMAT_VERSION, "json", [cache.digest(b) for b in blobs], column, *settings))
    path = cache.cache_file(cache_dir, key)
    hit = cache.read(path, key)
    if hit is not None:
        arrays, source_rows = hit
    else:
        records: list[dict] = []
        for blob in blobs:
            with _collector_paused():
                part = _json_records(blob)
            if part is None:
                _raise_json_syntax(files, blobs)
                return None
            records += part
        if not records:
            return None
        column = _conversation_column(list(records[0]), column, where)
        batch = {column: [r.get(column) for r in records]}
        source_rows = len(records)
        arrays = _encode_all(encoder, batch, source_rows, f"Tokenizing {Path(where).name}")
        if not (cache.caching_enabled() and cache.write(path, arrays, source_rows, key)):
            path = None
    return TokenizedDataset.from_arrays(
        arrays, tokenizer=encoder.tokenizer, name=where, source_rows=source_rows,
        max_seq_len=encoder.max_seq_len, cache_file=path,
    )
