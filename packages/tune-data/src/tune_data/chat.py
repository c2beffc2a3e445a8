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
the tokenizer in one call, and texts that may be cut where a trained span starts (just after
a newline, or for SentencePiece before a single space) are encoded in parts instead of twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from tune_data.instruct import _describe_source, _encode_all, _tokenize_records
from tune_data.ragged import flatten, gather
from tune_data.sources import DataFiles, _json_records, load_records, local_json_files
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
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise DataError("has no messages (expected a list of {role, content} or "
                        "{from, value} objects)")
    names = {**ROLE_NAMES, **(role_map or {})}
    messages = []
    for k, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise DataError(f"message {k} is not an object with a role and a content")
        sharegpt = message.get("role") is None and "from" in message
        role = message.get("from") if sharegpt else message.get("role")
        content = message.get("value") if sharegpt else message.get("content")
        if role not in names or names[role] not in ROLES:
            known = ", ".join(sorted(names))
            raise DataError(f"message {k} has the unknown role {role!r} (known: {known}); "
                            "map it with role_map={" + repr(role) + ": 'assistant'} or fix it")
        if not isinstance(content, str) or not content.strip():
            what = "an empty content" if isinstance(content, str) or content is None \
                else f"a content that is not text ({type(content).__name__})"
            raise DataError(f"message {k} ({names[role]}) has {what}; fill it in or remove "
                            "the row")
        messages.append({"role": names[role], "content": content})
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
    if not tokenizer.cuts_after_newline or not before or not after:
        return False
    if before[-1] == "\n" and not after[0].isspace():
        return True
    return (getattr(tokenizer, "splits_at_spaces", False) and after[0] == " "
            and before[-1] not in " \u2581")


class _Group:
    """Text encoded in one tokenizer call: its pieces' (trained, message) and where, in
    characters, each piece after the first starts."""

    __slots__ = ("cont", "index", "metas", "cuts", "prefixes")

    def __init__(self, cont: bool, index: int, metas: list, cuts: list[int]):
        self.cont = cont  # encoded as a continuation (after a cut), else as a text's start
        self.index = index  # position in the start or continuation texts
        self.metas = metas  # (trained, message) of each piece
        self.cuts = cuts  # character offsets of the pieces after the first
        self.prefixes: list[int] = []  # indices of text[:cut] in the same list, per cut


def encode_pieces(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[Piece]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """Token ids of rendered conversations, with the trained mask and message starts.

    Text between control tokens is one text, encoded as a whole would be: parts cut where
    :func:`_safe_cut` allows are encoded apart (that is exact), other cuts are placed where
    the encodings of the text and of its part before the cut stop agreeing (a token that
    spans the cut goes with the part after it).

    Args:
        tokenizer: The tokenizer.
        conversations: Each conversation's pieces (:meth:`ChatTemplate.pieces`).

    Returns:
        ``(tokens, offsets, trained, turn_starts)``: flat int32 ids, (N + 1,) offsets, flat
        bool (token j lies in a trained span), and per conversation the (token position,
        message index) where each message starts.
    """
    starts: list[str] = []  # texts encoded as a text's start
    conts: list[str] = []  # texts encoded after a cut
    plans: list[list] = []  # per conversation: Piece (control token) or _Group, in order

    def add(text: str, cont: bool) -> int:
        into = conts if cont else starts
        into.append(text)
        return len(into) - 1

    for pieces in conversations:
        plan: list = []
        run: list[Piece] = []  # text pieces encoded as one text
        for piece in pieces:
            if isinstance(piece.value, int) or piece.new_text:
                plan += _groups(tokenizer, run, add)
                run = []
            if isinstance(piece.value, int):
                plan.append(piece)
            elif piece.value:
                run.append(piece)
        plan += _groups(tokenizer, run, add)
        plans.append(plan)

    # Cuts that are not safe: the part before the cut is encoded too, in the same way.
    for plan in plans:
        for group in plan:
            if isinstance(group, _Group) and group.cuts:
                texts = conts if group.cont else starts
                whole = texts[group.index]
                group.prefixes = [add(whole[:c], group.cont) for c in group.cuts]

    start_ids, start_offsets = flatten(tokenizer.encode_batch(starts, add_bos=False))
    cont_ids, cont_offsets = tokenizer.encode_after_newline(conts) if conts else (
        np.zeros(0, np.int32), np.zeros(1, np.int64))
    specials: list[int] = []
    base = {False: 0, True: len(start_ids)}
    offsets_of = {False: start_offsets, True: cont_offsets}
    ids_of = {False: start_ids, True: cont_ids}

    seg_start: list[int] = []
    seg_len: list[int] = []
    seg_trained: list[bool] = []
    lengths: list[int] = []
    turn_starts: list[list[tuple[int, int]]] = []
    special_base = len(start_ids) + len(cont_ids)
    for plan in plans:
        position = 0
        first: dict[int, int] = {}
        for item in plan:
            if isinstance(item, Piece):
                seg_start.append(special_base + len(specials))
                specials.append(item.value)
                seg_len.append(1)
                seg_trained.append(item.trained)
                first.setdefault(item.message, position)
                position += 1
                continue
            offsets = offsets_of[item.cont]
            begin, end = int(offsets[item.index]), int(offsets[item.index + 1])
            bounds = [0]
            if item.cuts:
                ids = ids_of[item.cont]
                whole = ids[begin:end]
                for p in item.prefixes:
                    prefix = ids[int(offsets[p]) : int(offsets[p + 1])]
                    bounds.append(max(bounds[-1], _common_prefix(prefix, whole)))
            bounds.append(end - begin)
            for (trained, message), a, b in zip(item.metas, bounds, bounds[1:]):
                if b > a:
                    seg_start.append(base[item.cont] + begin + a)
                    seg_len.append(b - a)
                    seg_trained.append(trained)
                    first.setdefault(message, position)
                    position += b - a
        lengths.append(position)
        turn_starts.append(sorted((p, m) for m, p in first.items()))

    source = np.concatenate([start_ids, cont_ids, np.asarray(specials, dtype=np.int32)])
    seg_len_array = np.asarray(seg_len, dtype=np.int64)
    tokens, _ = gather(source, np.asarray(seg_start, dtype=np.int64), seg_len_array)
    trained = np.repeat(np.asarray(seg_trained, dtype=bool), seg_len_array)
    offsets = np.zeros(len(plans) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens.astype(np.int32, copy=False), offsets, trained, turn_starts


def _groups(tokenizer: Tokenizer, run: list[Piece], add) -> list[_Group]:
    """One text's pieces as groups encoded apart: a new group after every safe cut."""
    if not run:
        return []
    groups = []
    text, metas, cuts, cont = run[0].value, [run[0][1:3]], [], False
    for piece in run[1:]:
        if _safe_cut(tokenizer, text, piece.value):
            groups.append(_Group(cont, add(text, cont), metas, cuts))
            text, metas, cuts, cont = piece.value, [piece[1:3]], [], True
        else:
            cuts.append(len(text))
            text += piece.value
            metas.append(piece[1:3])
    groups.append(_Group(cont, add(text, cont), metas, cuts))
    return groups


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
        self.role_map = dict(role_map or {})
        self.where = where

    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int]):
        """For ``datasets.map(batched=True, with_indices=True)``: the batch as an Arrow table."""
        return self.encode(batch, np.asarray(indices, dtype=np.int64)).to_arrow()

    def encode(self, batch: Mapping[str, Sequence[Any]], rows: np.ndarray) -> TokenizedArrays:
        """Tokenise one batch; ``batch`` has one column of conversations, ``rows`` numbers
        them."""
        ((column, conversations),) = batch.items()
        all_pieces, all_roles = [], []
        for row, conversation in zip(rows.tolist(), conversations):
            try:
                if conversation is None:
                    raise DataError(f"has no '{column}'; fill it in or remove the row")
                messages = normalize_messages(conversation, self.role_map, self.system_prompt)
                all_pieces.append(self.template.pieces(messages, self.tokenizer))
            except DataError as e:
                raise DataError(f"{self.where}: row {row} (counting from 0): {e}") from None
            all_roles.append([ROLES.index(m["role"]) for m in messages])
        tokens, offsets, assistant, turn_starts = encode_pieces(self.tokenizer, all_pieces)
        return self._truncate(tokens, offsets, assistant, turn_starts, all_roles, rows)

    def _truncate(self, tokens, offsets, assistant, turn_starts, all_roles, rows):
        """Conversations longer than max_seq_len cut there, the mask kept as it was; one
        left without any trained token is dropped (counted by describe())."""
        n = len(rows)
        lengths = np.diff(offsets)
        limit = self.max_seq_len
        kept_len = lengths if limit is None else np.minimum(lengths, limit)
        truncated = kept_len < lengths
        keep = np.ones(n, dtype=bool)
        if truncated.any():
            # Assistant tokens that stay targets: positions 1 .. limit - 1 of the sample.
            counts = np.zeros(len(assistant) + 1, dtype=np.int64)
            np.cumsum(assistant, out=counts[1:])
            starts = offsets[:-1]
            left = counts[starts + kept_len] - counts[np.minimum(starts + 1, starts + kept_len)]
            keep = ~truncated | (left > 0)
            tokens, new_offsets = gather(tokens, starts[keep], kept_len[keep])
            assistant, _ = gather(assistant, starts[keep], kept_len[keep])
            offsets = new_offsets
        trained = np.ones(len(tokens), dtype=bool) if self.train_on_input else assistant
        turn_pos, turn_role, turn_counts = [], [], []
        for i in np.flatnonzero(keep).tolist():
            roles = all_roles[i]
            placed = [(p, m) for p, m in turn_starts[i] if 0 <= m < len(roles)
                      and p < kept_len[i]]
            turn_pos += [p for p, _ in placed]
            turn_role += [roles[m] for _, m in placed]
            turn_counts.append(len(placed))
        turn_offsets = np.zeros(len(turn_counts) + 1, dtype=np.int64)
        np.cumsum(turn_counts, out=turn_offsets[1:])
        turns = Turns(np.asarray(turn_pos, dtype=np.int32), np.asarray(turn_role, dtype=np.int8),
                      turn_offsets)
        return TokenizedArrays(tokens, offsets, trained, rows[keep], truncated[keep], turns)


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
            ``tokenizer_config.json`` holding ``chat_template``, or None for the model's
            own / its family's (:func:`tune_data.chat_templates.default_chat_template`).
        conversation_column: The column holding the conversations (default: ``messages``
            or ``conversations``, whichever the data has).
        system_prompt: A system message for conversations that have none.
        role_map: More role names, e.g. ``{"bot": "assistant"}``.
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
    if max_seq_len is not None and max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}")
    if source is None and data_files is None:
        raise DataError("a chat dataset needs a source (hub name or file; dataset_source in a "
                        "config) or data_files")
    source = source or ""
    template = load_chat_template(chat_template, tokenizer)
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
        return "jinja:" + hashlib.sha256(template.source.encode()).hexdigest()
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
            part = _json_records(blob)
            if part is None:
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
