"""Jinja chat templates are code from a model repository: the sandbox refuses what they may
reach (attributes, globals) and bounds what they may do (text length, loop iterations), each
as one line naming the template and the limit; real templates render as before."""

import json
import time

import pytest

from tune_data import DataError, JinjaChatTemplate, chat_dataset, chat_prompt, load_chat_template
from tune_data.jinja_sandbox import MAX_STEPS, TEXT_BASE, TEXT_PER_CHAR

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
LIMIT = TEXT_BASE + TEXT_PER_CHAR * len("userHiassistantHello")  # messages[:2], roles too

# Each goes past one limit by a small margin, so that without the bounds it renders (and the
# test fails) in well under a second instead of hanging.
SIZE = (f"past its limit of {LIMIT:,} characters for this conversation ({TEXT_BASE:,} plus "
        f"{TEXT_PER_CHAR} per character of its messages)")
STEPS = f"takes more than {MAX_STEPS:,} loop iterations and calls to render one conversation"
WRITES = f"writes more than {LIMIT:,} characters for this conversation, its limit"
BIG = "makes a number past 2**4096, its limit"
PAST_LIMIT = [
    ("{{ 'A' * 2000000 }}", "makes a text of 2,000,000 characters, " + SIZE),
    ("{{ ['A'] * 2000000 }}", "makes a list of 2,000,000 items, " + SIZE),
    ("{{ 'A'|center(2000000) }}", "asks center for a width of 2,000,000, " + SIZE),
    ("{{ 'A'.ljust(2000000) }}", "asks ljust for a width of 2,000,000, " + SIZE),
    ("{{ ['A']|map('center', 2000000)|list }}", "asks center for a width of 2,000,000, " + SIZE),
    ("{% filter indent(2000000) %}a{% endfilter %}", "asks indent for a width of 2,000,000"),
    ("{{ '%02000000d' % 1 }}", "asks the format '%02000000' for a width of 2,000,000, " + SIZE),
    ("{{ '{:>2000000}'.format(1) }}", "for a width of 2,000,000, " + SIZE),
    ("{{ ('A' * 2000).replace('A', 'A' * 2000) }}", "makes a text of 4,000,000 characters, "
     + SIZE),
    ("{{ (['A' * 2000] * 2000)|join }}", f"makes a text of more than {LIMIT:,} characters, "
     + SIZE),
    # Doubling through a namespace: `~` and lists are checked as they grow.
    ("{% set ns = namespace(s='A') %}{% for i in range(21) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s|length }}", "makes a text of 131,072 characters, " + SIZE),
    ("{% set ns = namespace(s='A') %}{% for i in range(21) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s|length }}", "makes a text of 131,072 characters, " + SIZE),
    ("{% set x = 'A' * 40000 %}{% set y = x + x %}{{ y|length }}",
     "makes a text of 80,000 characters, " + SIZE),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(20) %}{% set ns.l = [ns.l, ns.l] %}"
     "{% endfor %}{{ ns.l|tojson|length }}", f"makes a text of more than {LIMIT:,} characters"),
    ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", STEPS),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(20) }}",
     STEPS),
    ("{% for x in range(3) recursive %}{% if loop.depth < 3 %}{{ loop(range(1000)) }}"
     "{% endif %}{% endfor %}", STEPS),
    ("{% for i in range(100000) %}xx{% endfor %}", WRITES),
    ("{% set x %}{% for i in range(2000) %}{{ 'A' * 60 }}{% endfor %}{% endset %}", WRITES),
    ("{% filter upper %}{% for i in range(100000) %}x{% endfor %}{% endfilter %}", WRITES),
    ("{{ 2 ** 5000 }}", BIG),
    ("{% set ns = namespace(n=3) %}{% for i in range(14) %}{% set ns.n = ns.n * ns.n %}"
     "{% endfor %}{{ ns.n > 0 }}", BIG),
]


@pytest.mark.parametrize("source, message", PAST_LIMIT)
def test_a_template_past_a_limit_is_one_line_naming_it(source, message, qwen2_tokenizer,
                                                      tmp_path):
    path = tmp_path / "chat_template.jinja"
    path.write_text(source)
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        load_chat_template(str(path), qwen2_tokenizer).render(CHAT, qwen2_tokenizer)
    assert str(error.value).startswith(f"the chat template {path} ")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert time.perf_counter() - start < 60  # bounded: a second or two at most


def test_a_dataset_names_the_row_and_the_template(qwen2_tokenizer, tmp_path):
    """The first row's first render stops: no 200 MB text is built, let alone tokenised."""
    path = tmp_path / "t.jinja"
    path.write_text("{{ 'A' * 200000000 }}")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(3)))
    with pytest.raises(DataError) as error:
        chat_dataset(qwen2_tokenizer, data_files=str(data), chat_template=str(path),
                     cache_dir=tmp_path / "cache")
    assert str(error.value).startswith(
        f"{data}: row 0 (counting from 0): the chat template {path} makes a text of "
        "200,000,000 characters, past its limit of ")
    with pytest.raises(DataError, match="makes a text of 200,000,000 characters"):
        chat_prompt(qwen2_tokenizer, load_chat_template(str(path), qwen2_tokenizer), CHAT[:1])


def test_the_limit_grows_with_the_conversation(qwen2_tokenizer):
    """A template may write its conversation several times over (here 4x, plus headers)."""
    template = JinjaChatTemplate(
        "{% for m in messages %}{% for i in range(4) %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}{% endfor %}", "x4.jinja")
    long = [{"role": "user", "content": "word " * 40_000}]
    assert len(template.render(long, qwen2_tokenizer)) > TEXT_BASE
    with pytest.raises(DataError, match="x9.jinja writes more than"):
        JinjaChatTemplate("{% for i in range(9) %}{{ messages[0].content }}{% endfor %}",
                          "x9.jinja").render(long, qwen2_tokenizer)


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ (messages|attr('__class__')|attr('__base__')|attr('__subclasses__'))() }}",
    "{{ messages.append(1) }}{{ messages[0].update(role='x') }}",
    "{{ '{0.__class__}'.format(messages) }}{{ messages|attr('__class__') }}",
    "{{ strftime_now.__globals__ }}{{ messages|map(attribute='__class__')|list }}",
])
def test_attributes_globals_and_filters_stay_out_of_reach(source, qwen2_tokenizer):
    """What jinja2's sandbox refuses stays refused: an error, or nothing of Python's."""
    try:
        text = JinjaChatTemplate(source, "ssti.jinja").render(CHAT, qwen2_tokenizer)
    except DataError as error:
        assert "unsafe" in str(error) or "Undefined" in str(error), str(error)
    else:
        assert "<" not in text and "os" not in text, text  # no <class ...>, <module ...>


def test_control_token_names_in_content_stay_text(qwen2_tokenizer, tmp_path):
    """The built-in formats keep `<|im_end|>` in content as text; a Jinja template, which
    would turn it into the control token, refuses the row."""
    im_end = qwen2_tokenizer.token_id("<|im_end|>")
    smuggled = [{"role": "user", "content": "end it <|im_end|> here"},
                {"role": "assistant", "content": "ok"}]
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": smuggled}) + "\n")
    ids = chat_dataset(qwen2_tokenizer, data_files=str(data), chat_template="chatml",
                       cache_dir=tmp_path / "cache")[0]["tokens"].tolist()
    assert ids.count(im_end) == 2  # the two turns' own ends, not the one in the text
    assert qwen2_tokenizer.encode("end it <|im_end|> here", add_bos=False) == ids[3:3 + len(
        qwen2_tokenizer.encode("end it <|im_end|> here", add_bos=False))]
    with pytest.raises(DataError, match=r"message 0 \(user\) contains '<\|im_end\|>'"):
        chat_dataset(qwen2_tokenizer, data_files=str(data),
                     chat_template=str(qwen2_tokenizer.path.parent / "chat_template.jinja"),
                     cache_dir=tmp_path / "cache")


def test_a_template_file_that_is_not_utf8_is_one_line_naming_it(qwen2_tokenizer, tmp_path):
    path = tmp_path / "latin1.jinja"
    path.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(DataError) as error:
        load_chat_template(str(path), qwen2_tokenizer)
    assert str(error.value) == (f"chat template {path} is not UTF-8 text (byte 0xe9 at "
                                "position 7); save it as UTF-8")
    beside = tmp_path / "model"
    beside.mkdir()
    (beside / "tokenizer.json").write_bytes(qwen2_tokenizer.path.read_bytes())
    (beside / "chat_template.jinja").write_bytes(path.read_bytes())
    from tune_data import HFTokenizer

    with pytest.raises(DataError, match=f"chat template {beside / 'chat_template.jinja'} is "
                                        "not UTF-8 text"):
        load_chat_template(None, HFTokenizer(beside / "tokenizer.json"))
