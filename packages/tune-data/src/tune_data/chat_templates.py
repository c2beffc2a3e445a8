"""Chat templates: how a conversation becomes text and control tokens, and what is trained.

A template turns a list of messages (``{"role": "system" | "user" | "assistant", "content":
str}``) into :class:`Piece` s: text, or a control token by id, each marked with the message it
belongs to and whether it is part of an assistant turn's trained span (the answer and the
token that ends it; never the role header before it). :func:`tune_data.chat.encode_pieces`
tokenises pieces exactly as the whole text would be tokenised.

Built-in formats, written out as code from each family's reference:

* ``llama2``: Meta's Llama 2 chat format (``chat_completion`` in facebookresearch/llama's
  ``generation.py``): each user/assistant pair is its own text, ``<s>[INST] {user} [/INST]
  {answer} </s>``, contents stripped, a system prompt wrapped in ``<<SYS>>\\n...\\n<</SYS>>
  \\n\\n`` at the start of the first user message.
* ``llama3``: Meta's Llama 3 format (``ChatFormat`` in llama-models):
  ``<|begin_of_text|>``, then per message ``<|start_header_id|>{role}<|end_header_id|>\\n\\n
  {content stripped}<|eot_id|>``; the header, ``\\n\\n`` and content encoded apart.
* ``chatml``: ChatML (Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, as
  one text between the control tokens (no default system prompt: Qwen's own templates add
  one, use the model's ``tokenizer_config.json`` for that).
* ``mistral``: Mistral's v1 instruct format (mistral-common's ``InstructTokenizerV1``):
  ``<s>``, then ``[INST] {user} [/INST]`` and ``{answer}</s>``, each encoded apart; a system
  prompt goes before the first user message, followed by ``\\n\\n``.
* ``gemma``: Gemma's format (the chat template of Gemma 3's tokenizer_config.json):
  ``<bos>``, then per turn ``<start_of_turn>{user|model}\\n{content stripped}<end_of_turn>
  \\n`` (``model`` is the assistant's role); Gemma has no system role, so a system prompt
  and ``\\n\\n`` go before the first user turn's text, inside that turn.

Any other format comes as a Jinja template (a ``.jinja`` file, or the ``chat_template`` of a
``tokenizer_config.json``), rendered the way ``transformers.apply_chat_template`` renders it
(jinja2's sandbox, ``trim_blocks`` and ``lstrip_blocks``); which text belongs to which
message, and which of it is the assistant's answer, comes from rendering the conversation's
prefixes (see :class:`JinjaChatTemplate`).

Trained spans end with the token that ends the turn (``</s>``, ``<|eot_id|>``, ``<|im_end|>``):
generation stops there, so the model must learn to emit it. Text after it (ChatML's newline)
is not trained; this is what transformers' ``return_assistant_tokens_mask`` gives for a
template whose ``{% generation %}`` block holds the answer and ``<|im_end|>``. (torchtune
trains the role header and that newline as well.)
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tune_data import jinja_sandbox
from tune_data.errors import DataError
from tune_data.tokenizers import Tokenizer

Message = dict[str, str]  # {"role": ..., "content": ...}, roles as in tune_data.dataset.ROLES


class Piece(NamedTuple):
    """A run of text or one control token of a rendered conversation.

    Attributes:
        value: Text, or a control token's id.
        trained: Part of an assistant turn's trained span.
        message: Index of the message it belongs to (-1: before the first one).
        new_text: The text is encoded on its own, as the start of a text, instead of
            continuing the text piece before it (only meaningful for text).
    """

    value: str | int
    trained: bool
    message: int
    new_text: bool = False


class ChatTemplate(ABC):
    """A chat format. ``name`` is what configs call it (or the file it came from)."""

    name: str

    @abstractmethod
    def pieces(
        self, messages: Sequence[Message], tokenizer: Tokenizer, *,
        add_generation_prompt: bool = False,
    ) -> list[Piece]:
        """The conversation as pieces.

        Args:
            messages: The conversation, roles already normalised (system, user, assistant).
            tokenizer: Provides the control tokens' ids.
            add_generation_prompt: End with what starts an assistant turn (for generation).

        Returns:
            The pieces in order.

        Raises:
            DataError: If the format cannot hold this conversation (one line, without the
                row: the dataset adds it).
        """

    def with_enable_thinking(self, enable_thinking: bool | None) -> ChatTemplate:
        """This template with ``enable_thinking`` passed to it (None: as it is).

        Raises:
            DataError: If it has no such switch (no built-in format has one).
        """
        if enable_thinking is None:
            return self
        raise no_thinking_switch(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _alternating(messages: Sequence[Message], format_name: str) -> tuple[str | None, list]:
    """(system prompt, the other messages) of a format that needs user/assistant turns to
    alternate, starting with the user, after an optional leading system message."""
    system = None
    rest = list(messages)
    if rest and rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            number = i + (system is not None)
            if message["role"] == "system":
                problem = "a system message that is not the first"
            elif i == 0:
                problem = "an assistant turn before any user turn"
            else:
                problem = f"two {message['role']} turns in a row"
            raise DataError(
                f"message {number} makes {problem}; the {format_name} chat format needs "
                "user and assistant turns to alternate, starting with the user"
            )
    return system, rest


class Llama2ChatTemplate(ChatTemplate):
    """Meta's Llama 2 chat format; see the module docstring."""

    name = "llama2"
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def pieces(self, messages, tokenizer, *, add_generation_prompt=False):
        system, turns = _alternating(messages, self.name)
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        offset = 1 if system is not None else 0  # message index of turns[0]
        out: list[Piece] = []
        for i in range(0, len(turns), 2):
            user = turns[i]["content"]
            if i == 0 and system is not None:
                user = self.B_SYS + system + self.E_SYS + user
            k = i + offset
            if bos:
                out.append(Piece(bos[0], False, k))
            # Meta encodes "[INST] {user} [/INST] {answer} " as one text; the answer's leading
            # space (the "▁" of its first word) and the trailing space are the answer's.
            out.append(Piece(f"{self.B_INST} {user.strip()} {self.E_INST}", False, k, True))
            if i + 1 < len(turns):
                answer = turns[i + 1]["content"].strip()
                out += [Piece(f" {answer} ", True, k + 1), Piece(tokenizer.eos_id, True, k + 1)]
        return out


class MistralChatTemplate(ChatTemplate):
    """Mistral's v1 instruct format (Mistral 7B Instruct v0.1/v0.2, Mixtral 8x7B)."""

    name = "mistral"

    def pieces(self, messages, tokenizer, *, add_generation_prompt=False):
        system, turns = _alternating(messages, self.name)
        offset = 1 if system is not None else 0
        out = [] if tokenizer.bos_id is None else [Piece(tokenizer.bos_id, False, -1)]
        for i, message in enumerate(turns):
            content = message["content"]
            if message["role"] == "user":
                if i == 0 and system is not None:
                    content = system + "\n\n" + content
                out.append(Piece(f"[INST] {content} [/INST]", False, i + offset, True))
            else:
                out.append(Piece(content, True, i + offset, True))
                out.append(Piece(tokenizer.eos_id, True, i + offset))
        return out


class Llama3ChatTemplate(ChatTemplate):
    """Meta's Llama 3 chat format (Llama 3, 3.1, 3.2, 3.3); see the module docstring."""

    name = "llama3"

    def pieces(self, messages, tokenizer, *, add_generation_prompt=False):
        start = tokenizer.token_id("<|start_header_id|>")
        end = tokenizer.token_id("<|end_header_id|>")
        eot = tokenizer.token_id("<|eot_id|>")
        out = [] if tokenizer.bos_id is None else [Piece(tokenizer.bos_id, False, -1)]
        for k, message in enumerate(messages):
            out += self._header(message["role"], k, start, end)
            trained = message["role"] == "assistant"
            out.append(Piece(message["content"].strip(), trained, k, True))
            out.append(Piece(eot, trained, k))
        if add_generation_prompt:
            out += self._header("assistant", len(messages), start, end)
        return out

    @staticmethod
    def _header(role: str, k: int, start: int, end: int) -> list[Piece]:
        return [Piece(start, False, k), Piece(role, False, k, True), Piece(end, False, k),
                Piece("\n\n", False, k, True)]


class ChatMLTemplate(ChatTemplate):
    """ChatML, as Qwen writes it; see the module docstring."""

    name = "chatml"

    def pieces(self, messages, tokenizer, *, add_generation_prompt=False):
        start = tokenizer.token_id("<|im_start|>")
        end = tokenizer.token_id("<|im_end|>")
        out: list[Piece] = []
        for k, message in enumerate(messages):
            trained = message["role"] == "assistant"
            out += [Piece(start, False, k), Piece(message["role"] + "\n", False, k),
                    Piece(message["content"], trained, k), Piece(end, trained, k),
                    Piece("\n", False, k)]
        if add_generation_prompt:
            n = len(messages)
            out += [Piece(start, False, n), Piece("assistant\n", False, n)]
        return out


class GemmaChatTemplate(ChatTemplate):
    """Gemma's chat format (Gemma 2 and 3); see the module docstring."""

    name = "gemma"
    ROLES = {"user": "user", "assistant": "model"}

    def pieces(self, messages, tokenizer, *, add_generation_prompt=False):
        system, turns = _alternating(messages, self.name)
        start = tokenizer.token_id("<start_of_turn>")
        end = tokenizer.token_id("<end_of_turn>")
        for k, message in enumerate(messages):
            # Gemma's SentencePiece model reads its turn markers in any text (they are
            # user-defined pieces): content holding one would end the turn early.
            for name in ("<start_of_turn>", "<end_of_turn>"):
                if name in message["content"]:
                    raise DataError(
                        f"message {k} ({message['role']}) contains {name!r}, which Gemma's "
                        "tokenizer reads as its control token wherever it occurs; remove it"
                    )
        offset = 1 if system is not None else 0  # message index of turns[0]
        out = [] if tokenizer.bos_id is None else [Piece(tokenizer.bos_id, False, -1)]
        for i, message in enumerate(turns):
            k = i + offset
            trained = message["role"] == "assistant"
            header = self.ROLES[message["role"]] + "\n"
            if i == 0 and system is not None:  # folded into the first user turn, unstripped
                out += [Piece(start, False, 0), Piece(header + system + "\n\n", False, 0)]
            else:
                out += [Piece(start, False, k), Piece(header, False, k)]
            out += [Piece(message["content"].strip(), trained, k), Piece(end, trained, k),
                    Piece("\n", False, k)]
        if add_generation_prompt:
            out += [Piece(start, False, len(messages)), Piece("model\n", False, len(messages))]
        return out


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (Llama2ChatTemplate(), Llama3ChatTemplate(), ChatMLTemplate(),
                        MistralChatTemplate(), GemmaChatTemplate())
}


class JinjaChatTemplate(ChatTemplate):
    """A Jinja chat template, rendered in jinja2's sandbox as transformers renders it.

    The ids are those of the whole conversation's text (what ``apply_chat_template`` renders
    and tokenises), cut into pieces at the tokenizer's control-token names (as transformers
    tokenises a rendered conversation), at message boundaries and at the edges of trained
    spans. Those come from rendering prefixes of the conversation: message k starts where
    ``render(messages[:k])`` ends inside the whole text; an assistant message's trained span
    starts after the generation prompt (``render(messages[:k], add_generation_prompt=True)``)
    and ends with the last end-of-turn token in its text (the tokenizer's stop tokens).

    A template may write a turn differently once another follows: Qwen3's drops the
    reasoning (``<think>...</think>``) of assistant turns before the last user turn, and
    writes the last answer with a (possibly empty) think block. Where ``render(messages[:k])``
    is then not how the whole text begins, message k is found from its end instead: it
    ends where ``render(messages[:k + 1])`` ends, and is as long as the text it adds right
    after the turns before the rewritten one. Where even that fails (a template that
    rewrites the whole conversation as it grows), the row is refused: its masks cannot be
    found. An answer whose text does not follow its own generation prompt is found after
    the prompt the template writes without ``enable_thinking`` (Qwen3 with
    ``enable_thinking: false`` puts an empty think block in the prompt, but writes earlier
    answers without one).

    Message contents that contain a control-token name (``<|im_end|>``) are refused too:
    the rendered text would turn them into real control tokens (transformers does), which
    the built-in formats never do.

    Args:
        source: The template text.
        name: What to call it in messages (its file).
        enable_thinking: Passed to the template as ``enable_thinking`` (Qwen3: False writes
            an empty think block into the generation prompt, so the model answers without
            reasoning); None passes nothing. Only for a template that reads it.

    Raises:
        DataError: If ``enable_thinking`` is given and the template never reads it, or the
            template is not valid Jinja.
    """

    def __init__(self, source: str, name: str = "jinja template",
                 enable_thinking: bool | None = None):
        self.source = source
        self.name = name
        self.enable_thinking = enable_thinking
        self._compiled = None
        if enable_thinking is not None and "enable_thinking" not in self.variables():
            raise no_thinking_switch(name)

    def variables(self) -> frozenset[str]:
        """The variables the template reads from its caller (``messages``, ``tools``,
        ``enable_thinking``, ...), those it sets itself and the globals left out.

        Raises:
            DataError: If it is not valid Jinja.
        """
        import jinja2.meta

        env = _environment()
        try:
            found = jinja2.meta.find_undeclared_variables(env.parse(self.source))
        except jinja2.TemplateSyntaxError as e:
            raise self._syntax_error(e) from None
        return frozenset(found - set(env.globals))

    def with_enable_thinking(self, enable_thinking: bool | None) -> JinjaChatTemplate:
        """The same template with ``enable_thinking`` set (see the class)."""
        if enable_thinking is None:
            return self
        return JinjaChatTemplate(self.source, self.name, enable_thinking)

    def render(self, messages: Sequence[Message], tokenizer: Tokenizer,
               add_generation_prompt: bool = False) -> str:
        """The template's text for a conversation.

        Rendering is bounded (:mod:`tune_data.jinja_sandbox`): its text stays within
        :func:`~tune_data.jinja_sandbox.text_limit` of the conversation and its work within
        :data:`~tune_data.jinja_sandbox.MAX_STEPS`.

        Raises:
            DataError: If the template fails (a ``raise_exception`` in it, an error, a
                variable it uses that is not set) or goes past a limit.
        """
        return self._render(messages, tokenizer, add_generation_prompt,
                            jinja_sandbox.text_limit(messages))

    def _render(self, messages: Sequence[Message], tokenizer: Tokenizer,
                add_generation_prompt: bool, max_chars: int, thinking: bool = True) -> str:
        import jinja2

        template = self._template()
        names = _token_names(tokenizer)
        # What transformers' apply_chat_template passes (tools and documents None when
        # there are none); enable_thinking only when given (``thinking=False`` leaves it out).
        variables = {
            "messages": [dict(m) for m in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": names.get(tokenizer.bos_id, ""),
            "eos_token": names.get(tokenizer.eos_id, ""),
            "pad_token": names.get(tokenizer.pad_id, ""),
        }
        if self.enable_thinking is not None and thinking:
            variables["enable_thinking"] = self.enable_thinking
        try:
            return jinja_sandbox.render(template, self.name, max_chars, variables)
        except DataError:
            raise
        except jinja_sandbox.UndefinedVariable as e:
            given = ", ".join(sorted(variables))
            raise DataError(
                f"the chat template {self.name} uses the variable '{e.name}', which is not "
                f"set (a chat template is given {given}); fix the template, or test it with "
                f"'{e.name} is defined' first"
            ) from None
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template {self.name} failed: {e}") from None
        except Exception as e:  # a template is code: any error is a template error here
            raise DataError(f"the chat template {self.name} failed: {type(e).__name__}: {e}"
                            ) from None

    def _template(self):
        if self._compiled is None:
            import jinja2

            try:
                self._compiled = jinja_sandbox.compile_template(_environment(), self.source)
            except jinja2.TemplateSyntaxError as e:
                raise self._syntax_error(e) from None
        return self._compiled

    def _syntax_error(self, e) -> DataError:
        return DataError(f"the chat template {self.name} is not valid Jinja (line "
                         f"{e.lineno}: {e.message})")

    def pieces(self, messages, tokenizer, *, add_generation_prompt=False):
        special = _special_pattern(tokenizer)
        for k, message in enumerate(messages):
            found = special.search(message["content"]) if special is not None else None
            if found:
                raise DataError(
                    f"message {k} ({message['role']}) contains {found.group()!r}, which the "
                    f"template's text would turn into a control token; remove it, or use a "
                    "built-in chat_template (they keep such text as text)"
                )
        n = len(messages)
        # Every render of a prefix gets the whole conversation's limit.
        limit = jinja_sandbox.text_limit(messages)

        def render(prefix: Sequence[Message], prompt: bool = False, thinking: bool = True
                   ) -> str:
            return self._render(prefix, tokenizer, prompt, limit, thinking)

        last = render(messages)  # the text through the last message
        full = render(messages, True) if add_generation_prompt else last
        if not full.startswith(last):
            raise self._not_prefix_stable(n - 1)
        # renders[k]: the conversation before message k; bounds[k]: where message k starts
        # in the whole text (bounds[n]: where the last one ends).
        renders = [self._render_empty(tokenizer, limit)]
        renders += [render(messages[:k]) for k in range(1, n)] + [last]
        bounds: list[int | None] = [len(r) if full.startswith(r) else None for r in renders]
        bounds[0] = bounds[0] or 0
        for k in range(1, n):
            if bounds[k] is None:
                bounds[k] = self._start_from_end(messages, k, renders, bounds, full, render)
            if bounds[k] < bounds[k - 1]:
                raise self._not_prefix_stable(k - 1)
        stops = _stop_names(tokenizer)
        trained: list[tuple[int, int]] = []  # character spans
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._answer_start(messages, k, (bounds[k], bounds[k + 1]), full, render)
            ends = [full.rfind(stop, start, bounds[k + 1]) for stop in stops]
            end = max((e + len(stop) for e, stop in zip(ends, stops) if e >= 0),
                      default=bounds[k + 1])
            trained.append((start, end))
        return _cut(full, bounds, trained, special, tokenizer)

    def _start_from_end(self, messages, k: int, renders: list[str], bounds: list,
                        full: str, render) -> int:
        """Where message k starts when the text before it is rewritten once it follows
        (see the class): the end of ``render(messages[:k + 1])``, less the text message k
        adds right after ``messages[:k - 1]``."""
        through = renders[k + 1]
        if bounds[k + 1] is not None:
            try:
                skipped = render([*messages[: k - 1], messages[k]])
            except DataError:  # e.g. a template that needs its turns to alternate
                raise self._not_prefix_stable(k - 1) from None
            before = renders[k - 1]
            own = skipped[len(before):] if skipped.startswith(before) else None
            if own and through.endswith(own) and len(through) - len(own) >= bounds[k - 1]:
                return len(through) - len(own)
        raise self._not_prefix_stable(k - 1)

    def _answer_start(self, messages, k: int, span: tuple[int, int], full: str, render
                      ) -> int:
        """Where assistant message k's trained span starts: after its generation prompt, or
        after the prompt the template writes without ``enable_thinking`` (see the class);
        ``span`` is where the message lies in ``full``."""
        for thinking in (True, False) if self.enable_thinking is not None else (True,):
            prompt = render(messages[:k], True, thinking)
            if span[0] <= len(prompt) <= span[1] and full.startswith(prompt):
                return len(prompt)
        raise DataError(
            f"the chat template {self.name} does not start assistant message {k} with its "
            "own generation prompt, so the answer cannot be told from the template's text; "
            "use a built-in chat_template"
        )

    def _render_empty(self, tokenizer: Tokenizer, limit: int) -> str:
        """What the template renders before any message; "" if it cannot render none (many
        read ``messages[0]`` unguarded)."""
        try:
            return self._render([], tokenizer, False, limit)
        except DataError:
            return ""

    def _not_prefix_stable(self, k: int) -> DataError:
        return DataError(
            f"the chat template {self.name} renders the conversation up to message {k} "
            "differently inside the longer conversation (it rewrites earlier turns), so "
            "trained turns cannot be found; use a built-in chat_template"
        )


def no_thinking_switch(name: str) -> DataError:
    """The error for ``enable_thinking`` given with a template that never reads it."""
    return DataError(
        f"enable_thinking is set, but the chat template {name} has no enable_thinking switch "
        "(it never reads that variable; Qwen3's own template does); leave enable_thinking "
        "unset for this model's format"
    )


def _cut(text: str, bounds: list[int], trained: list[tuple[int, int]],
         special: re.Pattern | None, tokenizer: Tokenizer) -> list[Piece]:
    """Rendered text as pieces: control tokens by name, text cut where the message or the
    trained state changes. Message k starts at ``bounds[k]`` (text before ``bounds[0]``
    belongs to no message; after the last bound, to a generation prompt)."""
    matches = list(special.finditer(text)) if special is not None else []
    cuts = {0, len(text), *bounds, *(c for span in trained for c in span)}
    for m in matches:  # a control token is never split: a cut inside one moves before it
        cuts = {m.start() if m.start() < c < m.end() else c for c in cuts}
        cuts |= {m.start(), m.end()}
    cuts = sorted(c for c in cuts if 0 <= c <= len(text))
    tokens = {m.start(): tokenizer.special_tokens[m.group()] for m in matches}
    ends = {m.start(): m.end() for m in matches}
    out: list[Piece] = []
    for a, b in zip(cuts, cuts[1:]):
        message = bisect.bisect_right(bounds, a) - 1
        is_trained = any(s <= a < e for s, e in trained)
        if a in tokens and ends[a] == b:
            out.append(Piece(tokens[a], is_trained, message))
        else:
            out.append(Piece(text[a:b], is_trained, message))
    return out


def _token_names(tokenizer: Tokenizer) -> dict[int | None, str]:
    return {i: name for name, i in tokenizer.special_tokens.items()}


def _stop_names(tokenizer: Tokenizer) -> list[str]:
    names = _token_names(tokenizer)
    return [names[i] for i in tokenizer.stop_tokens if i in names]


def _special_pattern(tokenizer: Tokenizer) -> re.Pattern | None:
    """A regex matching any control-token name, longest first."""
    names = sorted(tokenizer.special_tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


@functools.cache
def _environment():
    """One bounded sandbox for every template (its settings never change)."""
    return jinja_sandbox.environment()


def load_chat_template(
    spec: str | Path | ChatTemplate | None, tokenizer: Tokenizer | None,
    family_template: str | None = None, *, enable_thinking: bool | None = None,
) -> ChatTemplate:
    """The chat template a config or command line names.

    Args:
        spec: A built-in name (``llama2``, ``llama3``, ``chatml``, ``mistral``, ``gemma``);
            a ``.jinja`` file; a ``tokenizer_config.json`` holding ``chat_template`` (or its
            folder); Jinja text itself; a ChatTemplate; or None for the model's default
            (:func:`default_chat_template`).
        tokenizer: The tokenizer the template will be used with (only the default needs
            it; a config check passes None).
        family_template: With ``spec`` None: the built-in format of the model's family
            (see :func:`default_chat_template`).
        enable_thinking: Passed to a template that reads it (Qwen3's); None: nothing.

    Returns:
        The template.

    Raises:
        DataError: If ``spec`` names nothing usable, or ``enable_thinking`` is given for a
            template without that switch.
    """
    return _load_chat_template(spec, tokenizer, family_template).with_enable_thinking(
        enable_thinking)


def _load_chat_template(spec: str | Path | ChatTemplate | None, tokenizer: Tokenizer | None,
                        family_template: str | None) -> ChatTemplate:
    if isinstance(spec, ChatTemplate):
        return spec
    if spec is None:
        if tokenizer is None:
            raise ValueError("the default chat template depends on the tokenizer: pass it")
        return default_chat_template(tokenizer, family_template)
    text = str(spec)
    if text in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[text]
    if "{{" in text or "{%" in text:
        return JinjaChatTemplate(text, "given in the config")
    path = Path(text).expanduser()
    if path.is_dir():
        found = _template_beside(path / "tokenizer.json")
        if found is None:
            raise DataError(f"chat_template folder {path} holds no chat_template.jinja and no "
                            "tokenizer_config.json with a chat_template")
        return found
    if path.is_file():
        if path.suffix == ".json":
            source = _chat_template_of(path)
            if source is None:
                raise DataError(f"{path} has no 'chat_template'; name a built-in format "
                                f"({', '.join(CHAT_TEMPLATES)}) or a .jinja file instead")
            return JinjaChatTemplate(source, str(path))
        return JinjaChatTemplate(_read_template(path), str(path))
    raise DataError(
        f"chat_template {text!r} is neither a built-in format ({', '.join(CHAT_TEMPLATES)}) "
        "nor an existing .jinja or tokenizer_config.json file"
    )


def _read_template(path: Path) -> str:
    """A .jinja file's text.

    Raises:
        DataError: If it is not UTF-8 (as Hugging Face repositories write them).
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"chat template {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                        f"at position {e.start}); save it as UTF-8") from None


def _chat_template_of(config: Path) -> str | None:
    """The ``chat_template`` of a tokenizer_config.json: a string, or the "default" one of a
    list of named templates."""
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise DataError(f"{config} is not a JSON object; fix it or name another "
                        "chat_template") from None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _template_beside(tokenizer_file: Path) -> ChatTemplate | None:
    """The model's own chat template, shipped beside its tokenizer file (Hugging Face
    repositories: ``chat_template.jinja``, or ``chat_template`` in tokenizer_config.json)."""
    folder = tokenizer_file.parent
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return JinjaChatTemplate(_read_template(jinja_file), str(jinja_file))
    config = folder / "tokenizer_config.json"
    if config.is_file():
        source = _chat_template_of(config)
        if source is not None:
            return JinjaChatTemplate(source, str(config))
    return None


def default_chat_template(tokenizer: Tokenizer,
                          family_template: str | None = None) -> ChatTemplate:
    """The chat format to use when a config names none.

    The model's own template shipped beside its tokenizer file comes first (a Hugging Face
    repository's ``chat_template.jinja`` or ``tokenizer_config.json``): training with exactly
    the format the model will be prompted with. Then the model family's format, which the
    caller that knows the family passes (tune-train takes it from
    ``tune_models.ModelFamily.chat_template``; this package does not know model families).
    Without one it is told from the tokenizer's control tokens: ``<|start_header_id|>``
    means Llama 3, ``<start_of_turn>`` Gemma, ``<|im_start|>`` ChatML, a SentencePiece model
    Llama 2 (Mistral's model
    cannot be told from Llama 2's by its tokens: that takes the family, or
    ``chat_template: mistral``).

    Args:
        tokenizer: The model's tokenizer.
        family_template: A built-in format name (a key of :data:`CHAT_TEMPLATES`), or None.

    Raises:
        DataError: If none of these tells the format.
    """
    own = _template_beside(Path(tokenizer.path))
    if own is not None:
        return own
    if family_template is not None:
        if family_template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown family chat format '{family_template}'; the built-in "
                             f"ones: {', '.join(CHAT_TEMPLATES)}")
        return CHAT_TEMPLATES[family_template]
    special = tokenizer.special_tokens
    if "<|start_header_id|>" in special and "<|eot_id|>" in special:
        return CHAT_TEMPLATES["llama3"]
    if "<start_of_turn>" in special and "<end_of_turn>" in special:
        return CHAT_TEMPLATES["gemma"]
    if "<|im_start|>" in special and "<|im_end|>" in special:
        return CHAT_TEMPLATES["chatml"]
    if "<s>" in special and "</s>" in special:
        return CHAT_TEMPLATES["llama2"]
    raise DataError(
        f"cannot tell which chat format {tokenizer.path} uses; set chat_template to one of "
        f"{', '.join(CHAT_TEMPLATES)} or a .jinja file"
    )
