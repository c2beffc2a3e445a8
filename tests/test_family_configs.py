"""Every shipped full fine-tune config, as a user meets it through `tune`: listed by `tune
config ls`, valid with its tokenizer and a checkpoint of its own model in place, and run for 3
steps on CPU at a tiny size with its family's real tokenizer and real Alpaca records; then
`tune eval --perplexity` on the checkpoint it wrote. One `tune` process per step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune_ckpt import write_model_args
from tune_data import load_tokenizer
from tune_models import MODELS, family_of
from tune_train.config import builtin_configs
from tune_train.metrics import read_jsonl_metrics

TUNE = str(Path(sys.executable).with_name("tune"))

# The demo trains its own tokenizer on generated data (tests/test_demo.py runs it as shipped);
# the LoRA configs run lora_finetune (tests/test_lora_configs.py).
CONFIGS = sorted(name for name in builtin_configs() if name != "demo"
                 and "lora_rank" not in yaml.safe_load(builtin_configs()[name].read_text()))
# What shrinks each model to a few seconds of CPU: every field that sets the family apart
# (tied embeddings, q/k/v biases, RoPE scaling, sliding window) stays the preset's.
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128}


def tune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _family(name: str) -> str:
    return family_of(yaml.safe_load(builtin_configs()[name].read_text())["model"]).name


def _tokenizer_file(name: str, request) -> Path:
    """The family's real tokenizer file in ../shared/data (skips when it is absent): Qwen3's
    vocab.json (its folder has no tokenizer.json), and for Gemma 3, whose tokenizer.model is
    not there, a SentencePiece model of its shape trained for the tests."""
    return request.getfixturevalue(f"{_family(name)}_tokenizer_path")


@pytest.fixture(scope="module", params=CONFIGS)
def trained(request, tmp_path_factory, alpaca_json_path):
    """(config name, output_dir, `tune run` result): 3 steps of the config, shrunk."""
    name = request.param
    tokenizer = _tokenizer_file(name, request)
    out = tmp_path_factory.mktemp(name) / "run"
    result = tune(
        "run", "full_finetune", "--config", name,
        "model_checkpoint=null", f"tokenizer_checkpoint={tokenizer}",
        f"data_files={alpaca_json_path}", f"model_args={json.dumps(TINY)}",
        "device=cpu", "dtype=fp32", "max_seq_len=128", "batch_size=2", "epochs=1",
        "max_steps_per_epoch=3", "metric_loggers=[jsonl]", "plot=false",
        f"output_dir={out}", cwd=out.parent)
    return name, out, result


def test_config_ls_lists_a_config_per_family():
    listed = tune("config", "ls", cwd=Path.cwd())
    assert listed.returncode == 0
    for name in ["llama3_1_8b_full", "llama3_2_1b_full", "mistral_7b_full",
                 "qwen2_5_0_5b_full", "qwen2_5_7b_full", "qwen3_0_6b_full", "gemma3_1b_full",
                 "alpaca_llama2_full_finetune"]:
        line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(name + " "))
        assert "GPU" in line or name == "alpaca_llama2_full_finetune"  # the hardware it needs


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_validates_against_its_own_model(name, tmp_path, request):
    """With the tokenizer path pointed at the family's real file and a converted checkpoint
    of the config's model in place (its tune_model.json; the weights are not read)."""
    preset = yaml.safe_load(builtin_configs()[name].read_text())["model"]
    weights = tmp_path / "native_pytorch_model.pt"
    weights.write_bytes(b"")
    write_model_args(tmp_path, vars(MODELS[preset]()))
    tokenizer = _tokenizer_file(name, request)
    result = tune("config", "validate", name, f"tokenizer_checkpoint={tokenizer}",
                  f"model_checkpoint={weights}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{name}: OK"


def test_each_config_trains_its_familys_model(trained, request):
    name, out, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    losses = [r["loss"] for r in read_jsonl_metrics(out / "metrics.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # Untrained, the loss is about ln(vocabulary): the output covers every id of the
    # family's tokenizer (128k for Llama 3, 152k for Qwen2 and Qwen3).
    vocab = load_tokenizer(_tokenizer_file(name, request)).vocab_size
    assert abs(losses[0] - math.log(vocab)) < 1.0
    # The checkpoint is the config's model at the tiny size: what sets its family apart kept.
    (step,) = (out / "checkpoints").iterdir()
    written = json.loads((step / "tune_model.json").read_text())
    preset = vars(MODELS[yaml.safe_load(builtin_configs()[name].read_text())["model"]]())
    for field in ("qkv_bias", "tie_embeddings", "rope_theta", "rope_scaling", "sliding_window",
                  "norm_eps"):
        assert written.get(field) == preset[field], field
    assert {k: written[k] for k in TINY} == TINY and written["vocab_size"] == vocab


def test_tune_eval_scores_every_token_with_the_familys_tokenizer(trained, request,
                                                                 tinyshakespeare_path):
    name, out, result = trained
    assert result.returncode == 0
    text = tinyshakespeare_path.read_text()[:3000]
    sample = out.parent / "sample.txt"
    sample.write_text(text)
    # The tokenizer is found through the run's config.yaml, as a user would rely on.
    evaluated = tune("eval", "--checkpoint", str(out), "--perplexity", str(sample),
                     "--device", "cpu", "--max-seq-len", "128", cwd=out.parent)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    n_tokens = len(load_tokenizer(_tokenizer_file(name, request)).encode(text, add_bos=False))
    line = evaluated.stdout.strip()
    assert f"over {n_tokens:,} tokens" in line, line  # Qwen2 has no BOS: EOS stands in
    assert math.isfinite(float(line.split()[1]))


def test_family_mistakes_are_one_line_through_tune(tmp_path, llama2_tokenizer_path,
                                                   qwen2_tokenizer_path):
    validated = tune("config", "validate", "llama3_2_1b_full",
                     f"tokenizer_checkpoint={llama2_tokenizer_path}", "model_checkpoint=null",
                     cwd=tmp_path)
    assert validated.returncode == 1
    assert validated.stderr.splitlines() == [
        f"error: tokenizer_checkpoint {llama2_tokenizer_path} is a SentencePiece "
        "tokenizer.model, but model 'llama3_2_1b' is a llama3 model, which reads a Llama 3 "
        "tiktoken tokenizer.model (original/tokenizer.model on the Hub) or a tokenizer.json; "
        "point tokenizer_checkpoint at the tokenizer that came with the model"]
    out = tmp_path / "out"
    run = tune("run", "full_finetune", "--config", "qwen2_5_0_5b_full", "model_checkpoint=null",
               f"tokenizer_checkpoint={qwen2_tokenizer_path}", "device=cpu",
               "model_args={rope_scaling: {rope_type: yarn, factor: 4.0}}", f"output_dir={out}",
               cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        "error: model_args: rope_scaling type 'yarn' is not supported (supported: llama3, linear); "
        "set rope_type to one of them or rope_scaling to None"]
    assert not out.exists()  # stopped at the config, before the run touched anything


def test_tokenizers_whose_ids_are_not_the_models_are_one_line_through_tune(
        tmp_path, llama3_tokenizer_path, qwen2_tokenizer_path, alpaca_json_path):
    """Files of the right format that would train on the wrong ids: Llama 3's tiktoken file
    cut after 5,000 ranks (<|begin_of_text|> would become 5000), and Qwen2's tokenizer.json
    (a format every family reads) with a Llama 3 model and `tokenizer: auto`."""
    cut = tmp_path / "cut" / "tokenizer.model"
    cut.parent.mkdir()
    cut.write_bytes(b"".join(llama3_tokenizer_path.read_bytes().splitlines(keepends=True)[:5000]))
    cases = [
        (cut, f"error: {cut} holds 5,000 tokens, but Llama 3's tiktoken file holds 128,000 "
              "(its special tokens start at id 128000): it is cut short or another model's "
              "file; pass the tokenizer.model that came with the Llama 3 checkpoint"),
        (qwen2_tokenizer_path,
         f"error: tokenizer_checkpoint {qwen2_tokenizer_path} has BOS none and EOS "
         "<|endoftext|> 151643, but llama3 models use BOS 128000 and EOS 128001: it is another "
         "model's tokenizer, or a damaged one; point tokenizer_checkpoint at the tokenizer that "
         "came with the model"),
    ]
    for tokenizer, line in cases:
        shown = tune("data", "stats", "llama3_2_1b_full", "tokenizer=auto",
                     f"tokenizer_checkpoint={tokenizer}",
                     f"data_files={alpaca_json_path}", cwd=tmp_path)
        assert shown.returncode == 1
        assert shown.stderr.splitlines() == [line]
