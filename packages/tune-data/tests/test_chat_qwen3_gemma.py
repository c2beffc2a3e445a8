"""Chat data of Qwen3 and Gemma 3 against transformers' apply_chat_template.

Qwen3: the real tokenizer folder (vocab.json + merges.txt, no tokenizer.json) and its own
chat_template.jinja, which rewrites earlier turns (their reasoning is dropped, the last
answer gets a think block) and reads ``enable_thinking``. Gemma 3: its format as the
built-in ``gemma`` and as Gemma's own Jinja template, with a SentencePiece model of Gemma's
shape trained for the test (testing/gemma_tokenizer.py) that transformers' GemmaTokenizer
converts too. Every comparison runs over the 500 real ShareGPT conversations (2, 4, 6
turns) or the 300 LLaMA-Factory preference prompts, token by token, masks included.
"""

import json

import pytest

from tune_data import (
    IGNORE_INDEX,
    DataError,
    JinjaChatTemplate,
    chat_dataset,
    chat_prompt,
    default_chat_template,
    load_chat_template,
    normalize_messages,
)
from tune_data.chat import encode_pieces

ROLE = {"human": "user", "gpt": "assistant"}

# Gemma 3's chat template (the chat_template of google/gemma-3-*-it's tokenizer_config.json),
# the reference the built-in `gemma` format is held to.
GEMMA3_JINJA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@pytest.fixture(scope="module")
def conversations(sharegpt_json_path):
    records = json.loads(sharegpt_json_path.read_text())
    return [[{"role": ROLE[m["from"]], "content": m["value"]} for m in r["conversations"]]
            for r in records]


@pytest.fixture(scope="module")
def qwen3_hf(qwen3_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_path.parent)


@pytest.fixture(scope="module")
def qwen3_marked(qwen3_tokenizer_path):
    """Qwen3's template with every answer and its <|im_end|> in a {% generation %} block, so
    that transformers computes its own assistant mask (return_assistant_tokens_mask)."""
    own = (qwen3_tokenizer_path.parent / "chat_template.jinja").read_text()
    think = ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + "
             "reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}")
    plain = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    end = "{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    assert own.count(think) == 1 and own.count(plain) == 2 and own.count(end) == 1
    marked = own.replace(think, "{%- set answer = '<think>\\n' + reasoning_content.strip('\\n')"
                                " + '\\n</think>\\n\\n' + content.lstrip('\\n') %}")
    marked = marked.replace(plain, "{%- set answer = content %}")
    return marked.replace(end, (
        "{{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- answer + '<|im_end|>' }}"
        "{% endgeneration %}{{- '\\n' }}\n    {%- elif message.role == \"tool\" %}"))


def build(tokenizer, path, tmp_path, **kwargs):
    return chat_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "cache",
                        max_seq_len=None, **kwargs)


def write_json(path, conversations):
    path.write_text(json.dumps([{"messages": c} for c in conversations]))
    return path


def trained_of(sample) -> list[bool]:
    """Whether each token is a target (labels are shifted: labels[j - 1] targets token j)."""
    labels = sample["labels"].tolist()
    return [False] + [lab != IGNORE_INDEX for lab in labels[:-1]]


def trained_texts(tokenizer, sample) -> list[str]:
    """The text of each trained span, control tokens by name."""
    names = {i: n for n, i in tokenizer.special_tokens.items()}
    spans, previous = [], False
    for token, trained in zip(sample["tokens"].tolist(), trained_of(sample)):
        if trained:
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = trained
    return ["".join(names.get(t, tokenizer.decode([t])) for t in span) for span in spans]


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def assert_equals_transformers(ds, hf, conversations, marked, own=None, **kwargs):
    """Every sample's ids and mask are transformers' for the marked template, which renders
    the same text as the model's own (``own``; None: the tokenizer's)."""
    for i, messages in enumerate(conversations):
        reference = hf.apply_chat_template(messages, chat_template=marked, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True,
                                           **kwargs)
        assert ds[i]["tokens"].tolist() == list(reference["input_ids"]), i
        assert trained_of(ds[i]) == [bool(m) for m in reference["assistant_masks"]], i
        assert _ids(hf.apply_chat_template(messages, chat_template=own, tokenize=True,
                                           **kwargs)) == list(
            reference["input_ids"]), i  # the marked template renders the model's own text


def test_qwen3_own_template_equals_transformers_ids_and_assistant_mask(
    qwen3_tokenizer, qwen3_hf, qwen3_marked, sharegpt_json_path, conversations, tmp_path
):
    """No chat_template given: Qwen3's chat_template.jinja beside vocab.json. Earlier answers
    are written without a think block, the last with an empty one (as Qwen3 answers when it
    thinks), which is trained with it."""
    assert default_chat_template(qwen3_tokenizer).name.endswith("chat_template.jinja")
    ds = build(qwen3_tokenizer, sharegpt_json_path, tmp_path)
    assert len(ds) == 500
    assert_equals_transformers(ds, qwen3_hf, conversations, qwen3_marked)
    answers = [m["content"] for m in conversations[3] if m["role"] == "assistant"]
    assert trained_texts(qwen3_tokenizer, ds[3]) == [
        *(a + "<|im_end|>" for a in answers[:-1]),
        "<think>\n\n</think>\n\n" + answers[-1] + "<|im_end|>"]


def test_qwen3_enable_thinking(qwen3_tokenizer, qwen3_hf, qwen3_marked, sharegpt_json_path,
                               conversations, tmp_path):
    """enable_thinking: false puts the empty think block into the generation prompt: no
    answer trains it. True renders as unset."""
    default = build(qwen3_tokenizer, sharegpt_json_path, tmp_path)
    off = build(qwen3_tokenizer, sharegpt_json_path, tmp_path, enable_thinking=False)
    on = build(qwen3_tokenizer, sharegpt_json_path, tmp_path, enable_thinking=True)
    for i, messages in enumerate(conversations):
        expected = _ids(qwen3_hf.apply_chat_template(messages, tokenize=True,
                                                     enable_thinking=False))
        assert off[i]["tokens"].tolist() == expected, i
        assert trained_texts(qwen3_tokenizer, off[i]) == [
            m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"], i
        assert on[i]["tokens"].tolist() == default[i]["tokens"].tolist(), i
        assert on[i]["labels"].tolist() == default[i]["labels"].tolist(), i
    prompt = conversations[0][:1]
    for thinking in (False, True):
        template = load_chat_template(None, qwen3_tokenizer, enable_thinking=thinking)
        assert chat_prompt(qwen3_tokenizer, template, prompt) == _ids(
            qwen3_hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                         enable_thinking=thinking))


def test_qwen3_drops_the_reasoning_of_earlier_turns_as_transformers_does(
    qwen3_tokenizer, qwen3_hf, qwen3_marked, conversations, tmp_path
):
    """Answers that carry their reasoning (<think>...</think> first): transformers writes it
    for the last answer only; the ids and masks are its, and the dropped reasoning is in
    no sample."""
    reasoned = [[{**m, "content": f"<think>\nStep {j} of {i}.\n</think>\n\n{m['content']}"}
                 if m["role"] == "assistant" else m for j, m in enumerate(c)]
                for i, c in enumerate(conversations[:150])]
    ds = build(qwen3_tokenizer, write_json(tmp_path / "reasoned.json", reasoned), tmp_path)
    assert_equals_transformers(ds, qwen3_hf, reasoned, qwen3_marked)
    for i, messages in enumerate(reasoned):
        text = qwen3_tokenizer.decode(ds[i]["tokens"].tolist())
        last = len(messages) - 1
        assert f"Step {last} of {i}." in text
        assert all(f"Step {j} of {i}." not in text for j in range(last))
        assert trained_texts(qwen3_tokenizer, ds[i])[-1].startswith(f"<think>\nStep {last} ")


@pytest.mark.parametrize("thinking", [None, False])
def test_qwen3_preference_prompts_equal_transformers(qwen3_tokenizer, qwen3_hf,
                                                     llamafactory_dpo_path, thinking):
    """The LLaMA-Factory preference prompts (system turns, up to 13 messages, ending with a
    user turn): the generation prompt, and the prompt with its chosen answer."""
    template = load_chat_template(None, qwen3_tokenizer, enable_thinking=thinking)
    extra = {} if thinking is None else {"enable_thinking": thinking}
    records = json.loads(llamafactory_dpo_path.read_text())
    prompts = [normalize_messages(r["conversations"]) for r in records]
    chosen = [p + normalize_messages([r["chosen"]]) for p, r in zip(prompts, records)]
    pieces = [template.pieces(p, qwen3_tokenizer, add_generation_prompt=True) for p in prompts]
    pieces += [template.pieces(c, qwen3_tokenizer) for c in chosen]
    tokens, offsets, _, _ = encode_pieces(qwen3_tokenizer, pieces)
    expected = [qwen3_hf.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                             **extra) for p in prompts]
    expected += [qwen3_hf.apply_chat_template(c, tokenize=True, **extra) for c in chosen]
    ours = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert len(ours) == 600 and ours == [_ids(e) for e in expected]
    assert chat_prompt(qwen3_tokenizer, template, prompts[0]) == ours[0]


@pytest.fixture(scope="module")
def gemma_hf(gemma3_tokenizer_path):
    from transformers import GemmaTokenizer

    return GemmaTokenizer.from_pretrained(gemma3_tokenizer_path.parent)


def gemma_marked() -> str:
    """GEMMA3_JINJA with each model turn's text and <end_of_turn> in a {% generation %}
    block."""
    content = "{%- if message['content'] is string -%}\n        {{ message['content'] | trim }}"
    end = "    {{ '<end_of_turn>\\n' }}\n"
    assert GEMMA3_JINJA.count(content) == 1 and GEMMA3_JINJA.count(end) == 1
    marked = GEMMA3_JINJA.replace(content, (
        "{%- if message['content'] is string and role == 'model' -%}{% generation %}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
        "{%- elif message['content'] is string -%}{{ message['content'] | trim }}"
        "{{ '<end_of_turn>\\n' }}"))
    return marked.replace(end, "")


@pytest.mark.parametrize("system", [None, "You are Gemma.  Answer briefly."])
def test_gemma_format_equals_transformers_with_gemmas_template(
    gemma3_tokenizer, gemma_hf, sharegpt_json_path, conversations, tmp_path, system
):
    """The built-in `gemma` and Gemma's own template give transformers' ids and masks; a
    system prompt goes, unstripped, before the first user turn's text."""
    tok = gemma3_tokenizer
    assert default_chat_template(tok).name == "gemma"  # told by <start_of_turn>
    assert default_chat_template(tok, "gemma").name == "gemma"
    messages = [c if system is None else [{"role": "system", "content": system}, *c]
                for c in conversations]
    builtin = build(tok, sharegpt_json_path, tmp_path, chat_template="gemma",
                    system_prompt=system)
    jinja = build(tok, sharegpt_json_path, tmp_path, system_prompt=system,
                  chat_template=JinjaChatTemplate(GEMMA3_JINJA, "gemma3.jinja"))
    marked = gemma_marked()
    assert_equals_transformers(builtin, gemma_hf, messages, marked, GEMMA3_JINJA)
    for i in range(len(messages)):
        assert jinja[i]["tokens"].tolist() == builtin[i]["tokens"].tolist(), i
        assert jinja[i]["labels"].tolist() == builtin[i]["labels"].tolist(), i
    # The built-in format's text, control tokens by name, is transformers' rendering.
    names = {i: n for n, i in tok.special_tokens.items()}
    gemma = load_chat_template("gemma", tok)
    for prompt in (messages[0][:-1], messages[5]):
        pieces = gemma.pieces(prompt, tok, add_generation_prompt=len(prompt) % 2 == 1)
        text = "".join(names[p.value] if isinstance(p.value, int) else p.value for p in pieces)
        assert text == gemma_hf.apply_chat_template(
            prompt, chat_template=GEMMA3_JINJA, tokenize=False,
            add_generation_prompt=len(prompt) % 2 == 1)
    prompt = messages[0][:-1]
    assert chat_prompt(tok, gemma, prompt) == _ids(gemma_hf.apply_chat_template(
        prompt, chat_template=GEMMA3_JINJA, tokenize=True, add_generation_prompt=True))


def test_chat_template_mistakes_are_one_line(qwen3_tokenizer, qwen2_tokenizer_path,
                                            gemma3_tokenizer, tmp_path):
    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    path = write_json(tmp_path / "c.json", [hi])
    own_qwen2 = qwen2_tokenizer_path.parent / "chat_template.jinja"
    cases = [
        (lambda: load_chat_template("chatml", qwen3_tokenizer, enable_thinking=False),
         "enable_thinking is set, but the chat template chatml has no enable_thinking switch "
         "(it never reads that variable; Qwen3's own template does); leave enable_thinking "
         "unset for this model's format"),
        (lambda: build(gemma3_tokenizer, path, tmp_path, enable_thinking=True),
         "enable_thinking is set, but the chat template gemma has no enable_thinking switch"),
        (lambda: load_chat_template(str(own_qwen2), None, enable_thinking=False),
         f"enable_thinking is set, but the chat template {own_qwen2} has no enable_thinking "
         "switch"),
        (lambda: build(qwen3_tokenizer, path, tmp_path, chat_template=(
            "{% for m in messages %}{{ m['content'] }}{{ separator }}{% endfor %}")),
         f"{path}: row 0 (counting from 0): the chat template given in the config uses the "
         "variable 'separator', which is not set (a chat template is given "
         "add_generation_prompt, bos_token, documents, eos_token, messages, pad_token, "
         "tools); fix the template, or test it with 'separator is defined' first"),
        (lambda: build(gemma3_tokenizer, write_json(tmp_path / "g.json", [
            [{"role": "user", "content": "Say <end_of_turn> now"}, hi[1]]]), tmp_path,
            chat_template="gemma"),
         "row 0 (counting from 0): message 0 (user) contains '<end_of_turn>', which Gemma's "
         "tokenizer reads as its control token wherever it occurs; remove it"),
        (lambda: build(gemma3_tokenizer, write_json(tmp_path / "a.json", [hi[::-1]]), tmp_path,
                       chat_template="gemma"),
         "message 0 makes an assistant turn before any user turn; the gemma chat format needs "
         "user and assistant turns to alternate, starting with the user"),
    ]
    for make, message in cases:
        with pytest.raises(DataError) as error:
            make()
        assert message in str(error.value) and "\n" not in str(error.value)
    # Tested rather than used, a variable no one set is false, as in jinja2.
    guarded = JinjaChatTemplate("{% if tools %}T{% endif %}{% if extra %}X{% endif %}"
                                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert guarded.render(hi, qwen3_tokenizer) == "HiYo"
