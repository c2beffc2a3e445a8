"""Every shipped LoRA / QLoRA config, as a user meets it through `tune`: listed, valid with its
tokenizer and a checkpoint of its own model in place, and run by `tune run lora_finetune` for
3 steps on CPU at a tiny size (its family's real tokenizer, real Alpaca records) from a base
checkpoint; the run leaves a PEFT adapter that `tune eval` and `tune generate` apply to that
base with `--adapter`. One `tune` process per step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tune_ckpt import load_peft_adapter, save_native, write_model_args
from tune_models import MODELS, Decoder, family_of
from tune_train import registry
from tune_train.config import builtin_configs, load_config
from tune_train.metrics import read_jsonl_metrics

TUNE = str(Path(sys.executable).with_name("tune"))
CONFIGS = sorted(name for name, path in builtin_configs().items()
                 if "lora_rank" in yaml.safe_load(path.read_text()))
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128}


def tune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _shipped(name: str) -> dict:
    return yaml.safe_load(builtin_configs()[name].read_text())


def _tokenizer_file(name: str, request) -> Path:
    return request.getfixturevalue(f"{family_of(_shipped(name)['model']).name}_tokenizer_path")


def test_the_lora_configs_are_shipped():
    assert CONFIGS == ["gemma3_4b_lora", "llama2_7b_lora", "llama3_1_8b_lora",
                       "llama3_1_8b_qlora", "qwen2_5_7b_lora", "qwen3_8b_lora",
                       "qwen3_8b_qlora"]
    listed = tune("config", "ls", cwd=Path.cwd())
    for name in CONFIGS:
        line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(name + " "))
        assert "GPU" in line
    assert _shipped("llama3_1_8b_qlora")["quantize_base"] == "nf4"
    assert _shipped("qwen3_8b_qlora")["quantize_base"] == "nf4"


@pytest.mark.parametrize("name", CONFIGS)
def test_each_lora_config_validates_against_its_own_model(name, tmp_path, request):
    preset = _shipped(name)["model"]
    weights = tmp_path / "native_pytorch_model.pt"
    weights.write_bytes(b"")
    write_model_args(tmp_path, vars(MODELS[preset]()))
    result = tune("config", "validate", name,
                  f"tokenizer_checkpoint={_tokenizer_file(name, request)}",
                  f"model_checkpoint={weights}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{name}: OK"


@pytest.fixture(scope="module", params=CONFIGS)
def trained(request, tmp_path_factory, alpaca_json_path):
    """(name, base checkpoint, output_dir, `tune run` result): 3 steps from a tiny base."""
    name = request.param
    tokenizer = _tokenizer_file(name, request)
    root = tmp_path_factory.mktemp(name)
    overrides = [f"tokenizer_checkpoint={tokenizer}", f"data_files={alpaca_json_path}",
                 f"model_args={json.dumps(TINY)}", "device=cpu", "dtype=fp32",
                 "max_seq_len=128", "batch_size=2", "gradient_accumulation_steps=1",
                 "epochs=1", "max_steps_per_epoch=3", "warmup_steps=0", "lr=1e-2",
                 "metric_loggers=[jsonl]", "plot=false", f"output_dir={root / 'run'}"]
    # The base: the config's model at the tiny size, as tune convert_checkpoint leaves one.
    cfg = load_config(name, [*overrides, "model_checkpoint=null"])
    config = registry.model_config(cfg)  # the preset's vocabulary, as a converted model has
    torch.manual_seed(0)
    model = Decoder(config)
    model.init_weights()
    base = root / "base" / "native_pytorch_model.pt"
    base.parent.mkdir()
    save_native(model.state_dict(), base, model_args=config,
                family=family_of(cfg.model).name)
    result = tune("run", "lora_finetune", "--config", name, f"model_checkpoint={base}",
                  *overrides, cwd=root)
    return name, base, root / "run", result, config


def test_each_lora_config_trains_an_adapter_of_its_model(trained):
    name, base, out, result, config = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    losses = [r["loss"] for r in read_jsonl_metrics(out / "metrics.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    adapter = load_peft_adapter(out, config)
    shipped = _shipped(name)
    assert adapter.settings.rank == shipped["lora_rank"]
    assert adapter.settings.targets == tuple(shipped["lora_target_modules"])
    assert adapter.quantize_base == shipped.get("quantize_base")
    assert any(v.abs().sum() > 0 for k, v in adapter.weights.items() if ".lora_b" in k)
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == shipped["lora_rank"]
    assert peft_config["base_model_name_or_path"] == str(base)
    (step,) = (out / "checkpoints").iterdir()
    assert not list(step.glob("native_pytorch_model.*"))  # no base weights in a checkpoint


def test_tune_eval_and_generate_apply_the_adapter_to_the_base(trained, tmp_path, request,
                                                               tinyshakespeare_path):
    name, base, out, result, _ = trained
    assert result.returncode == 0
    sample = tmp_path / "sample.txt"
    sample.write_text(tinyshakespeare_path.read_text()[:2000])
    tokenizer = _tokenizer_file(name, request)
    scores = {}
    for adapter in ([], ["--adapter", str(out)]):
        evaluated = tune("eval", "--checkpoint", str(base), *adapter, "--perplexity",
                         str(sample), "--device", "cpu", "--max-seq-len", "128",
                         "--tokenizer", str(tokenizer), cwd=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        scores[bool(adapter)] = float(evaluated.stdout.split()[1])
    assert scores[True] != scores[False]  # the adapter changed the model
    generated = tune("generate", "--checkpoint", str(base), "--adapter", str(out), "--prompt",
                     "Hello", "--max-new-tokens", "4", "--device", "cpu", "--tokenizer",
                     str(tokenizer), cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr[-2000:]


def test_an_adapter_of_another_base_is_one_line_in_tune_generate(trained, tmp_path, request):
    name, _, out, result, _ = trained
    if name != "llama2_7b_lora":
        pytest.skip("one family is enough")
    other = tmp_path / "other" / "native_pytorch_model.pt"
    other.parent.mkdir()
    config = MODELS["llama2_tiny"]()
    save_native(Decoder(config).state_dict(), other, model_args=config, family="llama2")
    generated = tune("generate", "--checkpoint", str(other), "--adapter", str(out), "--prompt",
                     "Hi", "--device", "cpu", "--tokenizer", str(_tokenizer_file(name, request)),
                     cwd=tmp_path)
    assert generated.returncode == 1
    lines = generated.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]
    assert "another base" in lines[0] or "shape" in lines[0], lines[0]
