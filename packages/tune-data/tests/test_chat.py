"""Chat data against references: Meta's formats, Mistral's, transformers' apply_chat_template.

Every comparison runs over the 500 real ShareGPT conversations (2, 4 and 6 turns) unless it
needs a feature they lack (system prompts, bad rows), and checks the loss mask token by token.
"""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from tune_data import (
    IGNORE_INDEX,
    DataError,
    JinjaChatTemplate,
    chat_dataset,
    chat_prompt,
    collate,
    default_chat_template,
    describe,
    load_chat_template,
    pack,
    render_sample,
)
from tune_data.chat import normalize_messages

ROLE = {"human": "user", "gpt": "assistant"}


@pytest.fixture(scope="module")
def conversations(sharegpt_json_path):
    """The ShareGPT file's conversations as {role, content} messages."""
    records = json.loads(sharegpt_json_path.read_text())
    return [[{"role": ROLE[m["from"]], "content": m["value"]} for m in r["conversations"]]
            for r in records]


def build(tokenizer, path, tmp_path, **kwargs):
    kwargs.setdefault("max_seq_len", 4096)
    return chat_dataset(tokenizer, data_files=path, cache_dir=tmp_path / "cache", **kwargs)


def trained_of(sample) -> list[bool]:
    """Whether each token is a target (labels are shifted: labels[j - 1] targets token j)."""
    labels = sample["labels"].tolist()
    return [False] + [lab != IGNORE_INDEX for lab in labels[:-1]]


def meta_llama2(sp, messages):
    """Meta's chat_completion (facebookresearch/llama generation.py), written out again with
    sentencepiece: each user/assistant pair is one text with BOS and EOS; the answer's
    tokens are those past the prompt's."""
    if messages[0]["role"] == "system":
        first = "<<SYS>>\n" + messages[0]["content"] + "\n<</SYS>>\n\n" + messages[1]["content"]
        messages = [{"role": "user", "content": first}, *messages[2:]]
    ids, trained = [], []
    for user, answer in zip(messages[::2], messages[1::2]):
        prompt = sp.encode(f"[INST] {user['content'].strip()} [/INST]", add_bos=True)
        whole = sp.encode(f"[INST] {user['content'].strip()} [/INST] "
                          f"{answer['content'].strip()} ", add_bos=True, add_eos=True)
        assert whole[: len(prompt)] == prompt
        ids += whole
        trained += [False] * len(prompt) + [True] * (len(whole) - len(prompt))
    return ids, trained


def test_llama2_is_metas_format_with_every_assistant_turn_trained(
    tokenizer, llama2_tokenizer_path, sharegpt_json_path, conversations, tmp_path
):
    ds = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2")
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    assert len(ds) == 500 and ds.rows.tolist() == list(range(500))
    turns_seen = set()
    for i, messages in enumerate(conversations):
        ids, trained = meta_llama2(sp, messages)
        assert ds[i]["tokens"].tolist() == ids, i
        assert trained_of(ds[i]) == [False] + trained[1:], i  # the first token is no target
        # Every assistant turn is trained through its </s>; the [INST] parts never are.
        assert sum(t for t, on in zip(ids, trained) if on and t == tokenizer.eos_id) == \
            len(messages) // 2 * tokenizer.eos_id
        turns_seen.add(len(messages))
    assert turns_seen == {2, 4, 6}


def test_llama2_equals_transformers_with_the_llama2_chat_jinja(
    tokenizer, llama2_tokenizer_path, llama2_7b_hf_config_path, sharegpt_json_path,
    conversations, tmp_path
):
    from transformers import AutoTokenizer

    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama2_7b_hf_config_path.parent / name, folder)
    shutil.copy(llama2_tokenizer_path, folder)
    # legacy=True: text after a control token gets SentencePiece's "▁" as Meta's own code
    # gives it (each pair is encoded as a text of its own there).
    hf = AutoTokenizer.from_pretrained(folder, legacy=True)
    ours = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2")
    via_jinja = build(tokenizer, sharegpt_json_path, tmp_path,
                      chat_template=JinjaChatTemplate(LLAMA2_CHAT_JINJA))
    for i, messages in enumerate(conversations):
        expected = _ids(hf.apply_chat_template(messages, chat_template=LLAMA2_CHAT_JINJA,
                                               tokenize=True))
        assert ours[i]["tokens"].tolist() == expected, i
        assert via_jinja[i]["tokens"].tolist() == expected, i
        assert via_jinja[i]["labels"].tolist() == ours[i]["labels"].tolist(), i


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


# The Llama-2-chat template of Meta's Hugging Face repositories.
LLAMA2_CHAT_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')"
    " }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def test_llama2_system_prompt_and_a_trailing_user_turn(tokenizer, llama2_tokenizer_path,
                                                       tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    messages = [
        {"role": "system", "content": "  You answer in one word.\n"},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": " And grass? "},
        {"role": "assistant", "content": "Green."},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    ds = build(tokenizer, path, tmp_path, chat_template="llama2")
    ids, trained = meta_llama2(sp, messages)
    assert ds[0]["tokens"].tolist() == ids
    assert trained_of(ds[0])[1:] == trained[1:]
    # A generation prompt is Meta's last, unanswered [INST] text.
    prompt = chat_prompt(tokenizer, load_chat_template("llama2", tokenizer), messages[:4])
    assert prompt == ids[: ids.index(tokenizer.eos_id) + 1] + sp.encode(
        "[INST] And grass? [/INST]", add_bos=True)


def test_qwen2_own_template_equals_transformers_ids_and_assistant_mask(
    qwen2_tokenizer, qwen2_tokenizer_path, sharegpt_json_path, conversations, tmp_path
):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen2_tokenizer_path.parent)
    # No chat_template given: the model's own chat_template.jinja beside tokenizer.json.
    assert isinstance(default_chat_template(qwen2_tokenizer), JinjaChatTemplate)
    ds = build(qwen2_tokenizer, sharegpt_json_path, tmp_path)
    own = (qwen2_tokenizer_path.parent / "chat_template.jinja").read_text()
    # The same template with the answer and <|im_end|> in a {% generation %} block, so that
    # transformers computes its own assistant mask (return_assistant_tokens_mask).
    marked = own.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    assert marked != own
    for i, messages in enumerate(conversations):
        reference = hf.apply_chat_template(messages, chat_template=marked, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
        assert ds[i]["tokens"].tolist() == list(reference["input_ids"]), i
        assert trained_of(ds[i]) == [bool(m) for m in reference["assistant_masks"]], i
        assert _ids(hf.apply_chat_template(messages, tokenize=True)) == \
            list(reference["input_ids"])  # the marked template renders the same text


def test_chatml_builtin_equals_transformers_with_a_system_prompt(
    qwen2_tokenizer, qwen2_tokenizer_path, sharegpt_json_path, conversations, tmp_path
):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen2_tokenizer_path.parent)
    system = "You are a helpful assistant"  # what Qwen's template adds when none is given
    ds = build(qwen2_tokenizer, sharegpt_json_path, tmp_path, chat_template="chatml",
               system_prompt=system)
    for i, messages in enumerate(conversations):
        expected = _ids(hf.apply_chat_template(
            [{"role": "system", "content": system}, *messages], tokenize=True))
        assert ds[i]["tokens"].tolist() == expected, i


# Meta's llama-models test (llama3/tests/api/test_tokenizer.py, test_encode_dialog): a system
# and a user message, then the header that prompts the assistant.
META_DIALOG_IDS = [
    128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
    128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
    128006, 78191, 128007, 271,
]

# The Llama 3 Instruct template of Meta's Hugging Face repositories.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def test_llama3_is_metas_format(llama3_tokenizer, sharegpt_json_path, conversations, tmp_path):
    template = load_chat_template("llama3", llama3_tokenizer)
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}]
    assert chat_prompt(llama3_tokenizer, template, dialog) == META_DIALOG_IDS
    assert chat_prompt(llama3_tokenizer, JinjaChatTemplate(LLAMA3_JINJA), dialog) == \
        META_DIALOG_IDS

    ds = build(llama3_tokenizer, sharegpt_json_path, tmp_path, chat_template="llama3")
    via_jinja = build(llama3_tokenizer, sharegpt_json_path, tmp_path,
                      chat_template=JinjaChatTemplate(LLAMA3_JINJA))
    header, end_header, eot = (llama3_tokenizer.token_id(n) for n in
                               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    for i, messages in enumerate(conversations):
        tokens = ds[i]["tokens"].tolist()
        assert tokens == via_jinja[i]["tokens"].tolist(), i
        assert ds[i]["labels"].tolist() == via_jinja[i]["labels"].tolist(), i
        # Trained: each answer and its <|eot_id|>, nothing of the headers.
        trained = trained_of(ds[i])
        spans = _runs(trained)
        assert len(spans) == len(messages) // 2
        for (a, b), answer in zip(spans, messages[1::2]):
            assert tokens[a - 4 : a] == [header, 78191, end_header, 271]  # assistant header
            assert tokens[b - 1] == eot
            assert tokens[a : b - 1] == llama3_tokenizer.encode(answer["content"].strip(),
                                                                add_bos=False)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    out, start = [], None
    for j, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = j
        elif not flag and start is not None:
            out.append((start, j))
            start = None
    return out


def test_mistral_is_mistral_commons_v1_format(mistral_tokenizer, mistral_tokenizer_path,
                                              sharegpt_json_path, conversations, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    ds = build(mistral_tokenizer, sharegpt_json_path, tmp_path, chat_template="mistral")
    for i, messages in enumerate(conversations):
        # mistral-common InstructTokenizerV1: BOS, then each message encoded on its own.
        ids, trained = [sp.bos_id()], [False]
        for m in messages:
            if m["role"] == "user":
                part = sp.encode(f"[INST] {m['content']} [/INST]")
                ids += part
                trained += [False] * len(part)
            else:
                part = sp.encode(m["content"]) + [sp.eos_id()]
                ids += part
                trained += [True] * len(part)
        assert ds[i]["tokens"].tolist() == ids, i
        assert trained_of(ds[i]) == trained, i


def test_a_system_prompt_goes_where_each_format_puts_it(mistral_tokenizer, qwen2_tokenizer,
                                                        llama3_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    mistral = chat_prompt(mistral_tokenizer, load_chat_template("mistral", mistral_tokenizer),
                          messages[:2])
    assert mistral_tokenizer.decode(mistral) == "[INST] Be brief.\n\nHi [/INST]"
    for tok, name, head in ((qwen2_tokenizer, "chatml", "<|im_start|>system\nBe brief."),
                            (llama3_tokenizer, "llama3",
                             "<|begin_of_text|><|start_header_id|>system<|end_header_id|>"
                             "\n\nBe brief.")):
        prompt = chat_prompt(tok, load_chat_template(name, tok), messages[:2])
        names = {i: n for n, i in tok.special_tokens.items()}
        text = "".join(names.get(t, tok.decode([t])) for t in prompt)
        assert text.startswith(head)


def test_every_family_defaults_to_its_format(tokenizer, llama3_tokenizer, qwen2_tokenizer):
    assert default_chat_template(tokenizer).name == "llama2"
    assert default_chat_template(llama3_tokenizer).name == "llama3"
    assert default_chat_template(qwen2_tokenizer).name.endswith("chat_template.jinja")


def test_the_family_format_comes_after_the_models_own(mistral_tokenizer, qwen2_tokenizer):
    # Mistral's SentencePiece model has Llama 2's tokens: only the family tells them apart.
    assert default_chat_template(mistral_tokenizer).name == "llama2"
    assert default_chat_template(mistral_tokenizer, "mistral").name == "mistral"
    assert load_chat_template(None, mistral_tokenizer, "mistral").name == "mistral"
    # A template shipped beside the tokenizer is the model's own: it wins over the family's.
    assert default_chat_template(qwen2_tokenizer, "chatml").name.endswith(
        "chat_template.jinja")
    assert load_chat_template("llama2", mistral_tokenizer, "mistral").name == "llama2"


def test_describe_and_render_show_turns(tokenizer, sharegpt_json_path, conversations,
                                        tmp_path):
    ds = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2")
    stats = describe(ds)
    assert stats.turns == {2: 167, 4: 166, 6: 167} and stats.assistant_turns == 1000
    assert "turns per conversation: 2 (167), 4 (166), 6 (167); 1,000 assistant turns" in \
        str(stats)
    assert stats.loss_tokens == sum(sum(trained_of(ds[i])) for i in range(len(ds)))
    six = next(i for i, m in enumerate(conversations) if len(m) == 6)
    text = render_sample(ds, six)
    assert text.count("── user ──") == 3 and text.count("── assistant ──") == 3
    assistant_parts = [part.split("── ")[0] for part in text.split("── assistant ──\n")[1:]]
    for part, answer in zip(assistant_parts, conversations[six][1::2]):
        # The answer is trained (outside the marks), with its </s>.
        assert part.strip() == answer["content"].strip() + " </s>"


def test_train_on_input_trains_every_turn(tokenizer, sharegpt_json_path, tmp_path):
    ds = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2",
               train_on_input=True)
    assert all(all(trained_of(ds[i])[1:]) for i in range(len(ds)))


def test_truncation_keeps_the_mask_and_is_counted(tokenizer, sharegpt_json_path,
                                                  conversations, tmp_path):
    whole = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2")
    six = [i for i, m in enumerate(conversations) if len(m) == 6]
    i = max(six, key=lambda j: whole.lengths[j])
    spans = _runs(trained_of(whole[i]))
    assert len(spans) == 3
    # Cut in the middle of the second answer, then in the third user turn.
    for cut in ((spans[1][0] + spans[1][1]) // 2, spans[1][1] + 3):
        short = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2",
                      max_seq_len=cut)
        j = short.rows.tolist().index(i)
        assert short.truncated[j]
        assert short[j]["tokens"].tolist() == whole[i]["tokens"].tolist()[:cut]
        assert trained_of(short[j]) == trained_of(whole[i])[:cut]
        assert short[j]["labels"].tolist()[-1] == IGNORE_INDEX  # nothing follows the cut
        stats = describe(short)
        assert stats.truncated == int((whole.lengths > cut).sum()) - stats.dropped
        # A conversation whose first answer does not start before the cut is dropped.
        first_answer = [_runs(trained_of(whole[k]))[0][0] for k in range(len(whole))]
        assert stats.dropped == sum(a >= cut for a in first_answer)
        assert f"truncated to {cut} tokens" in str(stats)


def test_masks_survive_packing(tokenizer, sharegpt_json_path, tmp_path):
    ds = build(tokenizer, sharegpt_json_path, tmp_path, chat_template="llama2", max_seq_len=256)
    packed = pack(ds, 256)
    assert packed.dropped == 0 and len(packed) < len(ds) / 2
    seen = 0
    for r in range(len(packed)):
        row = packed[r]
        pos = row["input_pos"].tolist()
        starts = [j for j, p in enumerate(pos) if p == 0] + [256]
        for sample, (a, b) in zip(packed.bins[r].tolist(), zip(starts, starts[1:])):
            assert row["tokens"][a:b].tolist() == ds[sample]["tokens"].tolist()
            assert row["labels"][a:b].tolist() == ds[sample]["labels"].tolist()
            seen += 1
    assert seen == len(ds)
    batch = collate([packed[0], packed[1]], pad_id=tokenizer.pad_id)
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        int(ds.loss_tokens[s]) for r in (0, 1) for s in packed.bins[r])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


@pytest.mark.parametrize(("bad", "template", "message"), [
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "llama2",
     "row 1 (counting from 0): message 0 has the unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]},
     "llama2", "row 1 (counting from 0): message 1 (assistant) has an empty content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}]}, "llama2",
     "row 1 (counting from 0): message 2 makes two assistant turns in a row; the llama2 chat "
     "format needs user and assistant turns to alternate"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}]},
     "mistral", "row 1 (counting from 0): message 1 makes two user turns in a row"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}]},
     LLAMA2_CHAT_JINJA, "row 1 (counting from 0): the chat template given in the config "
     "failed: Conversation roles must alternate"),
    ({"messages": [{"role": "user", "content": "say </s> please"}]}, LLAMA2_CHAT_JINJA,
     "row 1 (counting from 0): message 0 (user) contains '</s>'"),
    ({"messages": []}, "llama2", "row 1 (counting from 0): has no messages"),
    ({"conversation": []}, "llama2", "row 1 (counting from 0): has no 'messages'"),
])
def test_bad_rows_are_one_line_naming_the_row(tokenizer, tmp_path, bad, template, message):
    good = GOOD if "conversations" not in bad else {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError) as error:
        build(tokenizer, path, tmp_path, chat_template=template)
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)
    assert "\n" not in str(error.value)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer, tmp_path):
    # Puts the number of messages first: every prefix renders differently.
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(DataError, match="row 0 .* rewrites earlier turns"):
        build(tokenizer, path, tmp_path, chat_template=template)


def test_template_files_and_names(tokenizer, qwen2_tokenizer_path, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(LLAMA2_CHAT_JINJA)
    assert load_chat_template(str(jinja), tokenizer).source == LLAMA2_CHAT_JINJA
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}]}))
    assert load_chat_template(str(config), tokenizer).source == "{{ 1 }}"
    assert load_chat_template(str(qwen2_tokenizer_path.parent), tokenizer).name.endswith(
        "chat_template.jinja")
    with pytest.raises(DataError, match="neither a built-in format .*llama2, llama3, chatml"):
        load_chat_template("llama4", tokenizer)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(DataError, match="is not valid Jinja"):
        build(tokenizer, path, tmp_path, chat_template=str(broken))


def test_sharegpt_and_openai_styles_and_roles(tokenizer):
    sharegpt = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                {"from": "gpt", "value": "A"}]
    assert [m["role"] for m in normalize_messages(sharegpt)] == ["system", "user", "assistant"]
    assert normalize_messages([{"role": "bot", "content": "x"}], role_map={"bot": "assistant"})\
        == [{"role": "assistant", "content": "x"}]
    with_system = normalize_messages([{"role": "user", "content": "U"}], system_prompt="S")
    assert with_system[0] == {"role": "system", "content": "S"}


def test_parquet_and_json_give_the_same_samples(tokenizer, sharegpt_json_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = json.loads(sharegpt_json_path.read_text())[:60]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chats.parquet")
    json_path = tmp_path / "chats.json"
    json_path.write_text(json.dumps(records))
    direct = build(tokenizer, json_path, tmp_path, chat_template="llama2", max_seq_len=128)
    via_datasets = build(tokenizer, tmp_path / "chats.parquet", tmp_path,
                         chat_template="llama2", max_seq_len=128)
    assert direct.cache_file is not None and via_datasets.cache_file is None
    for name in ("_tokens", "_offsets", "_labels", "rows", "truncated"):
        np.testing.assert_array_equal(getattr(direct, name), getattr(via_datasets, name))
    for name in ("starts", "roles", "offsets"):
        np.testing.assert_array_equal(getattr(direct.turns, name),
                                      getattr(via_datasets.turns, name))
    assert str(describe(direct)).split("\n")[1:] == str(describe(via_datasets)).split("\n")[1:]
    again = build(tokenizer, json_path, tmp_path, chat_template="llama2", max_seq_len=128)
    np.testing.assert_array_equal(again._labels, direct._labels)  # read from the cache
    np.testing.assert_array_equal(again.turns.starts, direct.turns.starts)


# A format without control tokens: the whole conversation is one text, cut inside words'
# reach (after ": "), where part-by-part encoding would not be exact.
PLAIN_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### User: {{ m['content'] }}\n"
    "{% else %}### Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant: {% endif %}"
)


def test_cuts_inside_one_text_give_the_whole_texts_ids(any_tokenizer, conversations,
                                                       tmp_path):
    chats = conversations[:40] + [[
        {"role": "user", "content": "  indented\n\nquestion "},
        {"role": "assistant", "content": "\n\n  answer with space first"},
        {"role": "user", "content": "ok"}, {"role": "assistant", "content": " Yes."},
    ]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats])
    template = JinjaChatTemplate(PLAIN_JINJA)
    ds = build(any_tokenizer, path, tmp_path, chat_template=template)
    for i, messages in enumerate(chats):
        text = template.render(messages, any_tokenizer)
        tokens = ds[i]["tokens"].tolist()
        assert tokens == any_tokenizer.encode(text, add_bos=False), i
        trained = trained_of(ds[i])
        answers = [t for t, on in zip(tokens, trained) if on]
        asked = [t for t, on in zip(tokens, trained) if not on]
        for m in messages:
            # A token that spans the start of an answer is the answer's.
            where = answers if m["role"] == "assistant" else asked
            assert m["content"].strip() in any_tokenizer.decode(where), (i, m)
        assert "### User" not in any_tokenizer.decode(answers)


def test_contents_with_edge_whitespace_equal_transformers(qwen2_tokenizer,
                                                          qwen2_tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen2_tokenizer_path.parent)
    chats = [[{"role": "user", "content": "\n hi\n"}, {"role": "assistant", "content": " \n\nyo "},
              {"role": "user", "content": "x"}, {"role": "assistant", "content": "\tz\n"}]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats])
    for template in (None, "chatml"):
        ds = build(qwen2_tokenizer, path, tmp_path, chat_template=template,
                   system_prompt="You are a helpful assistant")
        expected = _ids(hf.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant"}, *chats[0]],
            tokenize=True))
        assert ds[0]["tokens"].tolist() == expected, template


def test_a_bad_jsonl_line_of_conversations_is_named_by_its_number(tokenizer, tmp_path):
    bad = '{"messages": [}'  # no value where the list's first one should be
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + bad + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=f"{path}: line 2 is not valid JSON \\(Expecting value "
                                        f"at column {bad.index('}') + 1}\\); fix or remove"):
        build(tokenizer, path, tmp_path, chat_template="llama2")
