"""Chat data through the real `tune` command: data show/stats, a short run, generate --chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TUNE = str(Path(sys.executable).with_name("tune"))


def tune(*args: str, env: dict | None = None, stdin: str | None = None):
    return subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=600, env=env,
                          input=stdin)


def chat_config(tmp_path: Path, data: str, tokenizer: str, tokenizer_kind: str,
                **extra) -> Path:
    cfg = {
        "dataset": "chat", "data_files": data, "tokenizer": tokenizer_kind,
        "tokenizer_checkpoint": tokenizer, "model": "llama2_tiny", "model_checkpoint": None,
        "max_seq_len": 128, "batch_size": 2, "lr": 1e-3, "epochs": 1,
        "max_steps_per_epoch": 3, "device": "cpu", "dtype": "fp32",
        "metric_loggers": ["jsonl"], "plot": False, "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_data_show_and_stats_of_a_chat_config(tmp_path, sharegpt_json_path,
                                              llama2_tokenizer_path):
    config = chat_config(tmp_path, str(sharegpt_json_path), str(llama2_tokenizer_path),
                         "llama2_tokenizer", chat_template="llama2")
    records = json.loads(sharegpt_json_path.read_text())
    shown = tune("data", "show", str(config), "--index", "2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("── user ──") == 3 and shown.stdout.count("── assistant ──") == 3
    for message in records[2]["conversations"]:
        assert message["value"] in shown.stdout
    # The user's turns are marked as taking no loss, the answers are not.
    assert "⟦<s>[INST] What is up? [/INST]⟧" in shown.stdout
    assert " Hello! How can I help you today? </s>\n" in shown.stdout

    stats = tune("data", "stats", str(config), "max_seq_len=64")
    assert stats.returncode == 0, stats.stderr
    assert "turns per conversation:" in stats.stdout and "assistant turns" in stats.stdout
    assert "sample(s) truncated to 64 tokens" in stats.stdout


def test_the_chat_format_is_the_model_familys(tmp_path, sharegpt_json_path,
                                              mistral_tokenizer_path):
    # Mistral's tokenizer.model has Llama 2's tokens; the model preset's family decides.
    config = chat_config(tmp_path, str(sharegpt_json_path), str(mistral_tokenizer_path), "auto",
                         model="mistral_tiny")
    mistral = tune("data", "show", str(config), "--index", "2")
    assert mistral.returncode == 0, mistral.stderr
    assert mistral.stdout.splitlines()[1:4] == ["⟦<s>⟧", "── user ──",
                                                "⟦ [INST] What is up? [/INST]⟧"]
    assert " Hello! How can I help you today?</s>\n" in mistral.stdout
    llama2 = tune("data", "show", str(config), "--index", "2", "model=llama2_tiny")
    assert llama2.returncode == 0, llama2.stderr
    assert "⟦<s>[INST] What is up? [/INST]⟧" in llama2.stdout
    assert " Hello! How can I help you today? </s>\n" in llama2.stdout
    # A named format wins over the family's.
    named = tune("data", "show", str(config), "--index", "2", "chat_template=llama2")
    assert named.stdout == llama2.stdout


def test_chat_validation_and_generate_use_the_familys_format(tmp_path, sharegpt_json_path,
                                                              mistral_tokenizer_path):
    from tune_data import chat_dataset, load_tokenizer
    from tune_train import registry
    from tune_train.config import load_config
    from tune_train.loading import checkpoint_family, model_family_of, resolve_chat_template

    records = json.loads(sharegpt_json_path.read_text())
    train, held = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text(json.dumps(records[:60]))
    held.write_text(json.dumps(records[60:80]))
    config = chat_config(tmp_path, str(train), str(mistral_tokenizer_path), "auto",
                         model="mistral_tiny", validation_data_files=str(held),
                         eval_every_n_steps=2)
    tok = load_tokenizer(mistral_tokenizer_path)
    validation = registry.build_validation_dataset(load_config(str(config)), tok)
    expected = chat_dataset(tok, data_files=str(held), chat_template="mistral",
                            max_seq_len=128, cache_dir=tmp_path / "cache")
    assert len(validation) == len(expected) == 20
    for i in range(20):
        assert validation[i]["tokens"].tolist() == expected[i]["tokens"].tolist(), i
        assert validation[i]["labels"].tolist() == expected[i]["labels"].tolist(), i
    steps = _run(config, tmp_path / "out")
    assert [s["step"] for s in steps if "val_loss" in s] == [2, 3]  # every 2 steps, epoch end
    # tune generate --chat on the run's checkpoint: the run's model names the family.
    weights = sorted((tmp_path / "out").glob("checkpoints/step_*/native_pytorch_model.pt"))[-1]
    assert model_family_of(weights).name == "mistral"
    assert checkpoint_family(weights) == "mistral"  # recorded beside the weights themselves
    assert registry.chat_template(resolve_chat_template(weights, None), tok,
                                  model_family_of(weights)).name == "mistral"


def test_a_bad_row_is_one_line(tmp_path, llama2_tokenizer_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "robot", "content": "Beep"}]}) + "\n")
    config = chat_config(tmp_path, str(data), str(llama2_tokenizer_path), "llama2_tokenizer")
    result = tune("data", "stats", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: row 0 (counting from 0): message 1 has the unknown role 'robot' "
        "(known: assistant, gpt, human, system, user); map it with role_map={'robot': "
        "'assistant'} or fix it"]


def test_config_validate_checks_the_chat_template(tmp_path, sharegpt_json_path,
                                                  llama2_tokenizer_path):
    config = chat_config(tmp_path, str(sharegpt_json_path), str(llama2_tokenizer_path),
                         "llama2_tokenizer", chat_template=str(tmp_path / "missing.jinja"))
    result = tune("config", "validate", str(config))
    assert result.returncode == 1
    assert f"error: chat_template '{tmp_path / 'missing.jinja'}' is neither a built-in " \
        "format (llama2, llama3, chatml, mistral, gemma)" in result.stderr
    assert tune("config", "validate", str(config), "chat_template=mistral").returncode == 0
    switch = tune("config", "validate", str(config), "chat_template=mistral",
                  "enable_thinking=false")
    assert switch.returncode == 1
    assert "error: enable_thinking is set, but the chat template mistral has no " \
        "enable_thinking switch" in switch.stderr


def test_chat_data_from_the_hub(tmp_path, hub_server, sharegpt_json_path,
                                llama2_tokenizer_path):
    records = json.loads(sharegpt_json_path.read_text())[:40]
    hub_server.add_repo("lmsys/chats", {
        "data/train.jsonl": "".join(json.dumps(r) + "\n" for r in records),
    }, repo_type="dataset")
    local = tmp_path / "local.json"
    local.write_text(json.dumps(records))
    config = chat_config(tmp_path, None, str(llama2_tokenizer_path), "llama2_tokenizer")
    from_hub = tune("data", "show", str(config), "dataset_source=lmsys/chats", "--index", "7",
                    "--ids", env=hub_server.env())
    assert from_hub.returncode == 0, from_hub.stderr
    from_file = tune("data", "show", str(config), f"data_files={local}", "--index", "7",
                     "--ids")
    assert from_hub.stdout == from_file.stdout
    stats = tune("data", "stats", str(config), "dataset_source=lmsys/chats",
                 env=hub_server.env())
    assert "40 samples from 40 records" in stats.stdout, stats.stderr


@pytest.fixture(scope="module")
def qwen2_tokenizer(qwen2_tokenizer_path):
    from tune_data import HFTokenizer

    return HFTokenizer(qwen2_tokenizer_path)


def _run(config: Path, out: Path) -> list[dict]:
    result = tune("run", "full_finetune", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    return steps


def test_a_short_chat_run_with_the_llama2_tokenizer(tmp_path, sharegpt_json_path,
                                                    llama2_tokenizer_path):
    config = chat_config(tmp_path, str(sharegpt_json_path), str(llama2_tokenizer_path),
                         "llama2_tokenizer", packing=True)
    _run(config, tmp_path / "out")


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, sharegpt_json_path, qwen2_tokenizer_path):
    """Three steps on the ShareGPT conversations with Qwen2's tokenizer and its own template."""
    tmp_path = tmp_path_factory.mktemp("qwen")
    config = chat_config(tmp_path, str(sharegpt_json_path), str(qwen2_tokenizer_path),
                         "qwen2_tokenizer", model="qwen2_tiny")
    _run(config, tmp_path / "out")
    return tmp_path / "out"


def _always_says(out: Path, token: int) -> None:
    """Rewrite the run's latest weights so the model predicts ``token`` after anything:
    every block adds nothing to the residual stream, every embedding points the same way,
    and ``token``'s output row matches it best."""
    weights = sorted(out.glob("checkpoints/step_*/native_pytorch_model.pt"))[-1]
    state = torch.load(weights, weights_only=True)
    for key, value in state.items():
        if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            value.zero_()
    direction = torch.ones(state["tok_embeddings.weight"].shape[1])
    state["tok_embeddings.weight"][:] = direction
    if "output.weight" in state:
        state["output.weight"].zero_()
        state["output.weight"][token] = direction
    else:  # tied embeddings: the output rows are the embeddings; one longer row wins
        state["tok_embeddings.weight"][token] = 2 * direction
    torch.save(state, weights)


def test_generate_chat_stops_at_the_end_of_turn_token(qwen_run, qwen2_tokenizer):
    im_end = qwen2_tokenizer.token_id("<|im_end|>")
    assert im_end != qwen2_tokenizer.eos_id  # so stopping there is not stopping at EOS
    _always_says(qwen_run, im_end)
    one = tune("generate", "--checkpoint", str(qwen_run), "--chat", "--system", "Be brief.",
               "-p", "Hello", "--max-new-tokens", "20")
    assert one.returncode == 0, one.stderr
    assert one.stdout == "\n" and " 1 new tokens" in one.stderr  # <|im_end|>, then stop
    chat = tune("generate", "--checkpoint", str(qwen_run), "--interactive",
                "--max-new-tokens", "20", stdin="Hello\n\nHow are you?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == "\n\n" and " 2 new tokens" in chat.stderr  # two turns, blank skipped
    plain = tune("generate", "--checkpoint", str(qwen_run), "-p", "Hello",
                 "--max-new-tokens", "20")
    assert " 1 new tokens" in plain.stderr  # plain prompts stop at end-of-turn tokens too


def test_generate_chat_formats_the_prompt_with_the_runs_template(qwen_run, qwen2_tokenizer):
    from tune_data import chat_prompt, load_chat_template
    from tune_train.loading import resolve_chat_template

    weights = sorted(qwen_run.glob("checkpoints/step_*/native_pytorch_model.pt"))[-1]
    assert resolve_chat_template(weights, None) is None  # the run named none: the default
    assert resolve_chat_template(weights, "chatml") == "chatml"
    prompt = chat_prompt(qwen2_tokenizer, load_chat_template(None, qwen2_tokenizer),
                         [{"role": "user", "content": "Hello"}])
    names = {i: n for n, i in qwen2_tokenizer.special_tokens.items()}
    text = "".join(names.get(t, qwen2_tokenizer.decode([t])) for t in prompt)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    wrong = tune("generate", "--checkpoint", str(qwen_run), "--chat", "--chat-template",
                 "llama3", "-p", "Hello")
    assert wrong.returncode == 1 and "no special token '<|start_header_id|>'" in wrong.stderr


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def family_run(request, tmp_path_factory, sharegpt_json_path):
    """(family, tokenizer file, output_dir): three steps on the ShareGPT conversations with
    the family's tiny model and tokenizer, in its own chat format (Qwen3's chat_template.jinja
    beside its vocab.json, with enable_thinking: false; Gemma's built-in format)."""
    family = request.param
    tokenizer = request.getfixturevalue(f"{family}_tokenizer_path")
    tmp_path = tmp_path_factory.mktemp(family)
    extra = {"enable_thinking": False} if family == "qwen3" else {}
    config = chat_config(tmp_path, str(sharegpt_json_path), str(tokenizer), "auto",
                         model=f"{family}_tiny", **extra)
    _run(config, tmp_path / "out")
    return family, tokenizer, tmp_path / "out"


def test_generate_chat_stops_at_each_familys_end_of_turn_token(family_run):
    from tune_data import load_tokenizer

    family, tokenizer_path, out = family_run
    tokenizer = load_tokenizer(tokenizer_path)
    end = tokenizer.token_id({"qwen3": "<|im_end|>", "gemma3": "<end_of_turn>"}[family])
    # Gemma's EOS is another token, so stopping there is not stopping at EOS (Qwen3's
    # post-trained tokenizer names <|im_end|> its EOS).
    assert (end == tokenizer.eos_id) == (family == "qwen3")
    _always_says(out, end)
    one = tune("generate", "--checkpoint", str(out), "--chat", "-p", "Hello",
               "--max-new-tokens", "20")
    assert one.returncode == 0, one.stderr
    assert one.stdout == "\n" and " 1 new tokens" in one.stderr  # the end of turn, then stop
    if family == "qwen3":  # the run's enable_thinking: false, and either switch, prompt it
        for switch in ("--thinking", "--no-thinking"):
            chosen = tune("generate", "--checkpoint", str(out), "--chat", switch, "-p", "Hi",
                          "--max-new-tokens", "20")
            assert chosen.returncode == 0 and " 1 new tokens" in chosen.stderr, chosen.stderr
    else:  # Gemma's format has no thinking switch: one line
        refused = tune("generate", "--checkpoint", str(out), "--chat", "--no-thinking", "-p",
                       "Hi")
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            "error: enable_thinking is set, but the chat template gemma has no "
            "enable_thinking switch (it never reads that variable; Qwen3's own template "
            "does); leave enable_thinking unset for this model's format"]


def test_enable_thinking_reaches_the_template_or_is_refused(family_run):
    """enable_thinking: false in the config reached the template (the run's data), and a
    run of a family without the switch stops at once with one line."""
    family, tokenizer_path, out = family_run
    shown = tune("data", "show", str(out.parent / "chat.yaml"), "--index", "3")
    assert shown.returncode == 0, shown.stderr
    if family == "qwen3":
        assert "⟦<|im_start|>assistant\n<think>\n\n</think>\n\n⟧" in shown.stdout
        return
    refused = tune("data", "show", str(out.parent / "chat.yaml"), "enable_thinking=false")
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        "error: enable_thinking is set, but the chat template gemma has no enable_thinking "
        "switch (it never reads that variable; Qwen3's own template does); leave "
        "enable_thinking unset for this model's format"]


HUGE = "{{ 'A' * 200000000 }}"
ENDLESS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
           "<|im_start|>user\n{{ messages[0].content }}")


def _tokenizer_with_template(folder: Path, source: str, qwen2_tokenizer_path: Path) -> Path:
    """Qwen2's tokenizer.json with `source` beside it as chat_template.jinja (the default)."""
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(qwen2_tokenizer_path.read_bytes())
    (folder / "chat_template.jinja").write_text(source)
    return folder / "tokenizer.json"


def _quick(*args: str) -> subprocess.CompletedProcess:
    # Without the bounds these ran for hours (or took gigabytes): give them a minute.
    return subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=120)


def test_a_template_beside_the_tokenizer_that_never_ends_is_one_line(
        tmp_path, qwen_run, qwen2_tokenizer_path, sharegpt_json_path):
    for name, source, message in [
        ("huge", HUGE, "makes a text of 200,000,000 characters, past its limit of "),
        ("endless", ENDLESS, "takes more than 250,000 loop iterations and calls to render one "
                             "conversation (its limit)"),
    ]:
        tokenizer = _tokenizer_with_template(tmp_path / name, source, qwen2_tokenizer_path)
        config = chat_config(tmp_path, str(sharegpt_json_path), str(tokenizer), "qwen2_tokenizer",
                             model="qwen2_tiny")
        shown = _quick("data", "show", str(config))
        assert shown.returncode == 1
        (line,) = shown.stderr.splitlines()
        assert line.startswith(f"error: {sharegpt_json_path}: row 0 (counting from 0): the chat "
                               f"template {tokenizer.parent / 'chat_template.jinja'} {message}")
    chat = _quick("generate", "--checkpoint", str(qwen_run), "--tokenizer", str(tokenizer),
                  "--chat", "-p", "Hello", "--max-new-tokens", "2")
    assert chat.returncode == 1
    assert chat.stderr.splitlines() == [
        f"error: the chat template {tokenizer.parent / 'chat_template.jinja'} takes more than "
        "250,000 loop iterations and calls to render one conversation (its limit); a chat "
        "template needs a few per message: check its loops"]


def test_a_run_with_nothing_to_train_stops_before_step_1(tmp_path, sharegpt_json_path,
                                                         llama2_tokenizer_path):
    """A template that renders nothing trained at loss 0.0000 and exited 0; data that
    max_seq_len drops entirely made `tune data show` an IndexError and the run ask for a
    lower batch_size."""
    empty = tmp_path / "empty.jinja"
    empty.write_text("{% for m in messages %}{% endfor %}")
    nothing = chat_config(tmp_path, str(sharegpt_json_path), str(llama2_tokenizer_path),
                          "llama2_tokenizer", chat_template=str(empty))
    run = tune("run", "full_finetune", "--config", str(nothing))
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: {sharegpt_json_path}: none of its 500 samples has a trained token, so a run "
        "would learn nothing (loss 0): its chat template renders nothing for every "
        "conversation; check the template"]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before step 1
    dropped = (f"{sharegpt_json_path}: all 500 records were dropped: a record is dropped when "
               "none of its trained tokens fit in max_seq_len 8 (a long prompt, or long turns "
               "before the first answer) or when it is empty; raise max_seq_len or check the "
               "data")
    short = chat_config(tmp_path, str(sharegpt_json_path), str(llama2_tokenizer_path),
                        "llama2_tokenizer", chat_template="llama2", max_seq_len=8)
    for command in (["data", "show", str(short)],
                    ["run", "full_finetune", "--config", str(short)]):
        result = tune(*command)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [f"error: {dropped}"], command
