"""Prompt templates: a prompt is a ``str.format`` string over a record's fields."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """How a record becomes a prompt; the response column is appended after it.

    Args:
        template: ``str.format`` text whose fields name the record's fields, e.g.
            ``"### Question:\\n{question}\\n\\n### Answer:\\n"``.
        template_without_input: Used instead when the ``input_field`` is empty (or a
            placeholder such as ``<noinput>``); None: always use ``template``.
        input_field: The optional field that switches between the two.
    """

    template: str
    template_without_input: str | None = None
    input_field: str = "input"

    @property
    def fields(self) -> list[str]:
        """Every field either template names, in order of first use."""
        names: list[str] = []
        for text in (self.template, self.template_without_input or ""):
            for _, field, _, _ in string.Formatter().parse(text):
                if field is not None and field not in names:
                    names.append(field)
        return names

    def render(self, record: Mapping[str, str]) -> str:
        """The prompt text of one record (input placeholders count as empty).

        Args:
            record: Field name to text.

        Returns:
            The prompt.
        """
        template = self.template
        if self.template_without_input is not None and is_empty_input(
            record.get(self.input_field, "")
        ):
            template = self.template_without_input
        return template.format(**record)


# The prompt of Stanford Alpaca's training code, with and without an input.
ALPACA = PromptTemplate(
    template=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    template_without_input=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

# Alpaca's generated data writes "no input" in many ways instead of leaving the field empty
# (about 60 of 5,000 records: "<noinput>", "No input.", "N/A", ...). Training on them would
# teach the model to expect the placeholder; they are compared with letters and digits only.
NO_INPUT_PLACEHOLDERS = frozenset(
    {"noinput", "noinputs", "noinputneeded", "noinputrequired", "na", "none", "nil", "empty"}
)
_NOT_ALNUM = re.compile(r"[\W_]+")


def is_empty_input(text: str) -> bool:
    """True for an empty or whitespace input and for placeholders such as ``<No Input>``."""
    if not text or text.isspace():
        return True
    return len(text) < 32 and _NOT_ALNUM.sub("", text.lower()) in NO_INPUT_PLACEHOLDERS


# Templates by the name configs use.
# The offline demo's tasks (tune_data.demo): short, so a tiny model spends its compute on them.
DEMO = PromptTemplate(template="{instruction}: {input}\n")

TEMPLATES: dict[str, PromptTemplate] = {"alpaca": ALPACA, "demo": DEMO}


def as_template(template: PromptTemplate | str) -> PromptTemplate:
    """A template, a name from :data:`TEMPLATES`, or a ``str.format`` prompt text."""
    if isinstance(template, PromptTemplate):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{" not in template:
        from tune_data.errors import DataError

        raise DataError(
            f"template {template!r} is neither a known name ({', '.join(TEMPLATES)}) nor a "
            "prompt with {field} placeholders"
        )
    return PromptTemplate(template)
