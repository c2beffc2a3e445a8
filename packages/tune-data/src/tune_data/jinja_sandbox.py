"""Jinja chat templates rendered in a sandbox that bounds their work, not only their reach.

jinja2's sandbox refuses attribute access (``__class__``, ``__globals__``) but not work: ``{{
'A' * 200000000 }}`` builds 200 MB, and two nested ``range(100000)`` loops run for hours. A
template is code from a model repository, and it is rendered once per conversation prefix,
thousands of times per dataset, so the bounds live inside rendering itself (no process or
thread per render):

* **Size.** No text or list a template makes may be longer than the render's limit,
  :func:`text_limit` of the conversation (64 KiB plus 8 characters per character of its
  messages), and everything it writes counts against that limit too (text written by a
  macro is counted where the macro writes it and again where its result is written). What
  can multiply a size is checked before it runs: ``*``, ``%`` and ``**``; the str methods
  of :data:`_GROWING_METHODS` (``center``, ``replace``, ``join``, ``format``, ...); the
  filters of :data:`_GROWING_FILTERS` (``center``, ``indent``, ``join``, ``replace``,
  ``tojson``, ...), which ``env.filters`` holds wrapped, so ``map('center', ...)`` is
  checked too. The result of every call (method, macro) and of every chain of ``+`` or
  ``~`` is checked after (a chain's parts are each within the limit already, so it cannot
  grow past a few times it). Numbers stay under 2**4096.
* **Work.** Every loop iteration and every call (macros, methods) is a step; one render may
  take :data:`MAX_STEPS`.

A variable no caller set is :class:`UndefinedVariable` where its value is used (written,
looped over, added to, its attribute read): jinja2 would write nothing and loop over
nothing, and a misspelt ``{{ mesage.content }}`` would lose text without a word. Tested
(``{% if tools %}``, ``x is defined``) it is false, as in jinja2, and an attribute or item a
value lacks (``message.tool_calls``) stays jinja2's lenient undefined: templates probe
optional fields so.

Each limit is one :class:`DataError` line naming the template and the limit. The bounds
are added to the parsed template (jinja2's public ``parse``, and ``from_string`` of the
changed tree): every ``for`` loop iterates through a counting filter, every output goes
through a counting filter, every ``+`` / ``~`` chain through a checking one. Those filters'
names hold a space, so a template can neither name nor replace them, and the counters
travel in the render's own variables under such a name too.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tune_data.errors import DataError

#: Steps (loop iterations and calls) one render may take. Real templates take a few per
#: message; this many take about a second at most.
MAX_STEPS = 250_000
#: The text limit of a render: this many characters, plus TEXT_PER_CHAR per character of
#: the conversation's messages.
TEXT_BASE = 65_536
TEXT_PER_CHAR = 8
#: Numbers a template makes stay under 2**MAX_INT_BITS (squaring in a loop would otherwise
#: grow without bound, and so would the time to print them).
MAX_INT_BITS = 4096

_LIMITS = "tune limits"  # render variable; a template cannot spell a name with a space
_LOOP, _WRITE, _CHECKED = "tune loop", "tune write", "tune checked"
_ORIGINAL = "tune original "  # + a filter's name: the built-in one, under a checking wrapper
_CONTAINERS = (list, tuple, dict, set, frozenset)


class UndefinedVariable(Exception):
    """A template used the value of a variable its caller did not set.

    Attributes:
        name: The variable's name.
    """

    def __init__(self, name: str):
        super().__init__(f"'{name}' is undefined")
        self.name = name


def text_limit(messages: Iterable[Mapping[str, Any]]) -> int:
    """The longest text a template may make for a conversation (see the module docstring)."""
    size = sum(len(str(m.get("content", ""))) + len(str(m.get("role", ""))) for m in messages)
    return TEXT_BASE + TEXT_PER_CHAR * size


class _Limits:
    """One render's counters (held in its variables, see :data:`_LIMITS`)."""

    __slots__ = ("name", "max_chars", "steps", "written")

    def __init__(self, name: str, max_chars: int):
        self.name = name
        self.max_chars = max_chars
        self.steps = 0
        self.written = 0

    def too_many_steps(self) -> DataError:
        return DataError(
            f"the chat template {self.name} takes more than {MAX_STEPS:,} loop iterations and "
            "calls to render one conversation (its limit); a chat template needs a few per "
            "message: check its loops"
        )

    def too_long(self, doing: str) -> DataError:
        """The error for a size past the limit; ``doing`` says what, e.g. "makes a text of
        200,000,000 characters"."""
        return DataError(
            f"the chat template {self.name} {doing}, past its limit of {self.max_chars:,} "
            f"characters for this conversation ({TEXT_BASE:,} plus {TEXT_PER_CHAR} per "
            "character of its messages); a chat template's text stays near the "
            "conversation's length"
        )

    def check_size(self, size: int, exact: bool = True) -> None:
        """Refuse a text of ``size`` characters (``exact=False``: at least that many)."""
        if size > self.max_chars:
            raise self.too_long(f"makes a text of {size:,} characters" if exact else
                                f"makes a text of more than {self.max_chars:,} characters")

    def check_width(self, width: int, asker: str) -> None:
        if width > self.max_chars:
            raise self.too_long(f"asks {asker} for a width of {width:,}")

    def check_items(self, size: int, kind: str) -> None:
        if size > self.max_chars:
            raise self.too_long(f"makes a {kind} of {size:,} items")

    def checked(self, value: Any) -> Any:
        """``value``, once its length is within the limit (numbers: their size)."""
        if isinstance(value, str):
            self.check_size(len(value))
        elif isinstance(value, _CONTAINERS):
            self.check_items(len(value), type(value).__name__)
        elif type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise self.big_number()
        return value

    def big_number(self) -> DataError:
        return DataError(
            f"the chat template {self.name} makes a number past 2**{MAX_INT_BITS}, its "
            "limit; a chat template has no use for one"
        )

    def wrote_too_much(self) -> DataError:
        return DataError(
            f"the chat template {self.name} writes more than {self.max_chars:,} characters "
            f"for this conversation, its limit ({TEXT_BASE:,} plus {TEXT_PER_CHAR} per "
            "character of its messages); check its loops"
        )


def _text_size(value: Any, limit: int) -> int:
    """About how long ``str(value)`` (or its JSON) is, counted no further than past
    ``limit``: a list holding itself a thousand times over is not walked a thousand times."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return 24  # a number, None, an Undefined: short
    size, stack = 0, [value]
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) + 4  # quotes and a separator
        elif isinstance(item, dict):
            size += 2
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, _CONTAINERS):
            size += 2
            stack += item
        else:
            size += 24
    return size


# Numbers in a printf spec ("%-0999999999d", "%.*f") and in a str.format spec ("{:>999}").
_PRINTF_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*?(\d+)")


def _format_widths(limits: _Limits, spec: str, pattern: re.Pattern) -> None:
    for match in pattern.finditer(spec):
        for width in match.groups():
            if width == "*":
                raise limits.too_long(f"formats with a '*' width ({match.group()!r})")
            if width is not None:
                limits.check_width(int(width), f"the format {match.group()!r}")


def _before_text_op(limits: _Limits, text: str, name: str, args: tuple,
                    kwargs: Mapping[str, Any]) -> None:
    """Refuse, before it runs, a string method or filter whose result would be too long."""
    limit = limits.max_chars
    values = [*args, *kwargs.values()]
    if name in ("center", "ljust", "rjust", "zfill", "indent", "wordwrap", "truncate"):
        for v in values:
            if type(v) is int:
                limits.check_width(v, name)
        if name == "indent":  # indent(width) puts the width (or a string) before each line
            width = next((v for v in values if isinstance(v, (int, str))), 4)
            width = width if type(width) is int else len(width)
            limits.check_size(len(text) + width * (text.count("\n") + 1))
    elif name == "expandtabs":
        size = next((v for v in values if type(v) is int), 8)
        limits.check_size(len(text) + max(size, 0) * text.count("\t"))
    elif name == "replace" and len(values) >= 2:
        old, new = str(values[0]), str(values[1])
        if len(new) > len(old):
            count = text.count(old) if old else len(text) + 1
            limits.check_size(len(text) + count * (len(new) - len(old)))
    elif name == "join" and values:
        items = values[0]
        if isinstance(items, _CONTAINERS):
            limits.check_size(_text_size(items, limit) + len(text) * len(items), exact=False)
    elif name in ("format", "format_map"):
        _format_widths(limits, text, _FORMAT_WIDTH)
        limits.check_size(len(text) + sum(_text_size(v, limit) for v in values), exact=False)


# The built-in filters whose result can be longer than what they are given (a width, a
# string put in, escapes, items joined); env.filters holds them wrapped (see environment),
# so they are checked however a template reaches them, map('center', ...) included. Every
# other filter keeps, drops or reorders what it is given.
_GROWING_FILTERS = frozenset({
    "batch", "center", "e", "escape", "forceescape", "format", "indent", "join", "list",
    "pprint", "replace", "slice", "string", "sum", "tojson", "truncate", "urlencode", "urlize",
    "wordwrap", "xmlattr",
})
# The str methods that can make a longer string than their own.
_GROWING_METHODS = frozenset({
    "center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "format",
    "format_map",
})


def _before_filter(limits: _Limits, name: str, value: Any, args: tuple,
                   kwargs: Mapping[str, Any]) -> None:
    limit = limits.max_chars
    if name == "join":
        separator = str(args[0]) if args else str(kwargs.get("d", ""))
        if isinstance(value, _CONTAINERS):
            limits.check_size(_text_size(value, limit) + len(separator) * len(value),
                              exact=False)
    elif name == "format":  # "%s"|format(...): printf formatting
        _format_widths(limits, str(value), _PRINTF_WIDTH)
        limits.check_size(len(str(value)) + sum(_text_size(v, limit) for v in
                                                (*args, *kwargs.values())), exact=False)
    elif name == "sum" and isinstance(value, _CONTAINERS):  # lists or strings added up
        limits.check_size(_text_size(value, limit), exact=False)
    elif name in ("batch", "slice"):  # rows of a width, padded with fill_with
        for v in (*args, *kwargs.values()):
            if type(v) is int:
                limits.check_width(v, name)
    elif name in ("tojson", "pprint", "string", "list", "e", "escape", "forceescape",
                  "urlencode", "xmlattr"):
        limits.check_size(_text_size(value, limit), exact=False)
    elif isinstance(value, str):
        _before_text_op(limits, value, name, args, kwargs)


def _before_binop(limits: _Limits, operator: str, left: Any, right: Any) -> None:
    """Refuse, before it runs, a ``*``, ``**`` or ``%`` whose result would be too big."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str) and type(times) is int:
                limits.check_size(len(seq) * times)
            elif isinstance(seq, (list, tuple)) and type(times) is int:
                limits.check_items(len(seq) * times, type(seq).__name__)
        if type(left) is int and type(right) is int and (
                left.bit_length() + right.bit_length() > MAX_INT_BITS + 1):
            raise limits.big_number()
    elif operator == "**" and type(left) is int and type(right) is int:
        if abs(left) > 1 and right > 0 and right * left.bit_length() > MAX_INT_BITS + 1:
            raise limits.big_number()
    elif operator == "%" and isinstance(left, str):
        _format_widths(limits, left, _PRINTF_WIDTH)
        limits.check_size(len(left) + _text_size(right, limits.max_chars), exact=False)


def environment():
    """jinja2's immutable sandbox with the helpers chat templates expect, as transformers
    renders them (so the text, and so the ids, agree), and the bounds of this module."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import pass_context
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        # return_assistant_tokens_mask; here masks come from prefixes, so it just renders.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        # `+` is checked where a chain of them ends (see _bounds_visitor): it is the
        # operator templates join their text with, and a call per `+` costs a third of the
        # render.
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            limits: _Limits = context.parent[_LIMITS]
            _before_binop(limits, operator, left, right)
            return _checked(context, self.binop_table[operator](left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's names)
            limits: _Limits = __context.parent[_LIMITS]
            limits.steps += 1
            if limits.steps > MAX_STEPS:
                raise limits.too_many_steps()
            if args and type(__obj) is LoopContext:  # a recursive loop's loop(children)
                args = (_counted(limits, args[0]), *args[1:])
            # A str method, e.g. "x".center(9); str.format comes wrapped by the sandbox.
            owner = getattr(__obj, "__self__", None)
            if owner is None and hasattr(__obj, "__wrapped__"):
                owner = getattr(__obj.__wrapped__, "__self__", None)
            if type(owner) is str and __obj.__name__ in _GROWING_METHODS:
                _before_text_op(limits, owner, __obj.__name__, args, kwargs)
            value = super().call(__context, __obj, *args, **kwargs)
            if isinstance(value, (str, *_CONTAINERS)) and len(value) > TEXT_BASE:
                limits.checked(value)
            elif type(value) is int and value.bit_length() > MAX_INT_BITS:
                raise limits.big_number()
            return value

    class Undefined(jinja2.Undefined):
        # Only a variable's name (no object it was looked up on, no hint) is strict.
        __slots__ = ()

        def _fail_with_undefined_error(self, *args, **kwargs):
            if self._is_variable():
                raise UndefinedVariable(self._undefined_name)
            return super()._fail_with_undefined_error(*args, **kwargs)

        # jinja2 binds its operators to its own _fail_with_undefined_error: bind them here.
        __add__ = __radd__ = __sub__ = __rsub__ = _fail_with_undefined_error
        __mul__ = __rmul__ = __div__ = __rdiv__ = _fail_with_undefined_error
        __truediv__ = __rtruediv__ = _fail_with_undefined_error
        __floordiv__ = __rfloordiv__ = _fail_with_undefined_error
        __mod__ = __rmod__ = _fail_with_undefined_error
        __pos__ = __neg__ = _fail_with_undefined_error
        __call__ = __getitem__ = _fail_with_undefined_error
        __lt__ = __le__ = __gt__ = __ge__ = _fail_with_undefined_error
        __int__ = __float__ = __complex__ = _fail_with_undefined_error
        __pow__ = __rpow__ = _fail_with_undefined_error

        def _is_variable(self) -> bool:
            return (self._undefined_obj is jinja2.utils.missing and self._undefined_hint is None
                    and isinstance(self._undefined_name, str))

        def __str__(self) -> str:
            if self._is_variable():
                raise UndefinedVariable(self._undefined_name)
            return ""

        def __iter__(self):
            if self._is_variable():
                raise UndefinedVariable(self._undefined_name)
            return iter(())

        def __len__(self) -> int:
            if self._is_variable():
                raise UndefinedVariable(self._undefined_name)
            return 0

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which a prompt must not see.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    @pass_context
    def loop(context, iterable):
        return _counted(context.parent[_LIMITS], iterable)

    @pass_context
    def write(context, value):
        limits: _Limits = context.parent[_LIMITS]
        if type(value) is not str:
            if isinstance(value, _CONTAINERS):
                limits.check_size(_text_size(value, limits.max_chars), exact=False)
            value = str(value)
        limits.written += len(value)
        if limits.written > limits.max_chars:
            raise limits.wrote_too_much()
        return value

    def growing(name):
        original = _ORIGINAL + name

        @pass_context
        def checked_filter(context, value, *args, **kwargs):
            _before_filter(context.parent[_LIMITS], name, value, args, kwargs)
            return _checked(context, context.environment.call_filter(
                original, value, args, kwargs, context=context, eval_ctx=context.eval_ctx))

        return checked_filter

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, undefined=Undefined,
                         extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    for name in _GROWING_FILTERS:  # the original under a name no template can spell
        env.filters[_ORIGINAL + name] = env.filters[name]
        env.filters[name] = growing(name)
    env.filters.update({_LOOP: loop, _WRITE: write, _CHECKED: pass_context(_checked)})
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    # Random text at any length (lipsum(n=100000) is minutes of work): no template needs it.
    env.globals.pop("lipsum", None)
    return env


def _checked(context, value: Any) -> Any:
    """``value``, once within the render's limits; what no render's limit could refuse is
    let through without looking the limits up (this runs for every `+` chain and call)."""
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise context.parent[_LIMITS].big_number()
    elif isinstance(value, (str, *_CONTAINERS)) and len(value) > TEXT_BASE:
        context.parent[_LIMITS].checked(value)
    return value


def _counted(limits: _Limits, iterable: Any) -> Iterable[Any]:
    """``iterable``, each of its items counted as a step: a list, string, dict or range up
    front (all of them, even if the loop breaks early), anything else as it is taken."""
    if isinstance(iterable, (str, *_CONTAINERS, range)):
        limits.steps += len(iterable)
        if limits.steps > MAX_STEPS:
            raise limits.too_many_steps()
        return iterable
    return _counting(limits, iterable)


def _counting(limits: _Limits, iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        limits.steps += 1
        if limits.steps > MAX_STEPS:
            raise limits.too_many_steps()
        yield item


def compile_template(env, source: str):
    """``source`` compiled with the bounds added (see the module docstring).

    Raises:
        jinja2.TemplateSyntaxError: If it is not valid Jinja.
    """
    return env.from_string(_bounds_visitor()().visit(env.parse(source)))


def render(template, name: str, max_chars: int, variables: dict[str, Any]) -> str:
    """The compiled template's text, within the limits.

    Raises:
        DataError: Past a limit (one line naming the template ``name`` and the limit).
        Anything the template raises.
    """
    return template.render({**variables, _LIMITS: _Limits(name, max_chars)})


@functools.cache
def _bounds_visitor():
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    class Bounds(NodeTransformer):
        """Routes loops, outputs, `+` and `~` through the counting filters."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, _LOOP, [], [], None, None, lineno=node.lineno)
            return node

        def visit_Output(self, node):
            # What is written is counted, so a `+` or `~` written directly needs no check.
            node.nodes = [nodes.Filter(self._unchecked(child), _WRITE, [], [], None, None,
                                       lineno=node.lineno) for child in node.nodes]
            return node

        def visit_Add(self, node):
            return self._checked(self._unchecked(node))

        def visit_Concat(self, node):
            return self._checked(self._unchecked(node))

        def _unchecked(self, node):
            """``node`` with its parts transformed but without a check of its own, where it
            is a `+` or `~`: the parts of a chain of them are not checked one by one, their
            sum is (each part is a value already within the limit, so the chain's
            intermediate results stay within the chain's length times it)."""
            if isinstance(node, nodes.Add):
                node.left, node.right = self._unchecked(node.left), self._unchecked(node.right)
                return node
            if isinstance(node, nodes.Concat):
                node.nodes = [self._unchecked(child) for child in node.nodes]
                return node
            return self.visit(node)

        @staticmethod
        def _checked(node):
            return nodes.Filter(node, _CHECKED, [], [], None, None, lineno=node.lineno)

    return Bounds

