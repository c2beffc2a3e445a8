"""lora_finetune on tiny CPU runs: step 0 is the base model, checkpoints hold the adapter and
its optimizer state only, kill -9 then resume reproduces the losses bit for bit, the output
dir ends with a PEFT adapter, and every bad setting is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tune_ckpt import load_native, load_peft_adapter, save_native
from tune_models import Decoder, apply_lora, llama2_tiny, lora_state_dict, quantize_base
from tune_train.checkpointing import checkpoint_root, latest_checkpoint
from tune_train.metrics import read_jsonl_metrics

from train_helpers import tiny_config

TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "output"]
STEPS = 9


@pytest.fixture(scope="module")
def base(demo_files, tmp_path_factory) -> Path:
    """A seeded llama2_tiny base checkpoint with the demo tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = llama2_tiny(vocab_size=64)
    model = Decoder(config)
    model.init_weights()
    path = tmp_path_factory.mktemp("base") / "native_pytorch_model.pt"
    save_native(model.state_dict(), path, model_args=config, family="llama2")
    return path


def _lora(demo_files, base: Path, out: Path, **extra) -> dict:
    return tiny_config(demo_files, **{
        "output_dir": str(out), "model_checkpoint": str(base), "model_args": {"vocab_size": 64},
        "lora_rank": 4, "lora_alpha": 8.0, "lora_target_modules": TARGETS, "lr": 1e-2,
        **extra})


def _start(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tune_train.recipes.lora_finetune", "--config", str(config),
         *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl_metrics(out / "metrics.jsonl")}


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_step_zero_is_the_base_model(demo_files, base, tmp_path, nf4):
    from train_helpers import recipe_model

    model, _ = recipe_model(_lora(demo_files, base, tmp_path / "run",
                                  quantize_base="nf4" if nf4 else None), lora=True)
    if True:  # (the model as lora_finetune builds it before its first step)
        model = model.eval()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(".lora_a" in n or ".lora_b" in n for n in trained)
        # Per block: an A and a B for each of q, k, v (in the fused wqkv), o, gate, up and
        # down; and the output projection's pair.
        assert len(trained) == model.config.n_layers * 7 * 2 + 2
        reference = Decoder(llama2_tiny(vocab_size=64))
        reference.load_state_dict(load_native(base))
        if nf4:  # QLoRA's base is the NF4 one: step 0 reproduces that model
            quantize_base(reference.requires_grad_(False), "nf4")
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(model(tokens), reference.eval()(tokens))


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_kill_then_resume_gives_the_uninterrupted_losses(demo_files, base, tmp_path, nf4):
    def config(name: str) -> tuple[Path, Path]:
        out = tmp_path / name
        cfg = _lora(demo_files, base, out, max_steps_per_epoch=STEPS, save_every_n_steps=2,
                    lr_scheduler="cosine", warmup_steps=2, lora_dropout=0.1,
                    quantize_base="nf4" if nf4 else None)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, out

    reference_config, reference = config("reference")
    _finish(_start(reference_config))
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1]  # the adapters learn

    killed_config, killed = config("killed")
    for target in (3, 6):  # kill -9 in the middle of the steps after a checkpoint, twice
        proc = _start(killed_config, "resume_from_checkpoint=True")
        deadline = time.monotonic() + 120
        path = killed / "metrics.jsonl"
        while proc.poll() is None and time.monotonic() < deadline and not (
                path.exists() and len(path.read_text().splitlines()) >= target):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _finish(_start(killed_config, "resume_from_checkpoint=True"))
    assert _losses(killed) == expected  # bit for bit, dropout included

    # A checkpoint holds the adapter and the optimizer state: KBs here, no base weights.
    latest = latest_checkpoint(killed)
    names = {p.name for p in latest.iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "tune_adapter.json",
                     "training_state", "trainer_state.json", "rng_state.pt"}
    trainable = sum(v.numel() for v in load_peft_adapter(latest, llama2_tiny(vocab_size=64))
                    .weights.values())
    assert (latest / "adapter_model.safetensors").stat().st_size < trainable * 4 + 10_000
    size = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
    assert size < base.stat().st_size  # adapter, AdamW's two moments, progress
    # The output dir ends with the trained adapter in PEFT's format, as the last checkpoint.
    config_model = llama2_tiny(vocab_size=64)
    final = load_peft_adapter(killed, config_model)
    last = load_peft_adapter(latest, config_model)
    assert final.settings.targets == tuple(TARGETS) and final.quantize_base == (
        "nf4" if nf4 else None)
    assert all(torch.equal(final.weights[k], last.weights[k]) for k in last.weights)
    assert any(v.abs().sum() > 0 for k, v in final.weights.items() if ".lora_b" in k)
    assert not any(p.name.startswith(".tmp-") for p in checkpoint_root(killed).iterdir())


def test_the_adapter_applies_to_the_base_in_tune_generate_and_eval_loading(demo_files, base,
                                                                          tmp_path):
    """loading.load_model(base, adapter=DIR) is the base with the trained adapter merged."""
    from tune_train.loading import load_model

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_lora(demo_files, base, tmp_path / "run",
                                           max_steps_per_epoch=2)))
    _finish(_start(config))
    merged, _ = load_model(base, device="cpu", adapter=tmp_path / "run")
    model = Decoder(llama2_tiny(vocab_size=64))
    model.load_state_dict(load_native(base))
    apply_lora(model, rank=4, alpha=8.0, targets=TARGETS)
    adapter = load_peft_adapter(tmp_path / "run", llama2_tiny(vocab_size=64))
    model.load_state_dict({**model.state_dict(), **adapter.weights})
    assert lora_state_dict(model).keys() == adapter.weights.keys()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), model.eval()(tokens), atol=1e-5, rtol=0)
        assert not torch.allclose(merged(tokens), load_model(base, device="cpu")[0](tokens))


def _error(config: dict, tmp_path: Path, recipe: str = "lora_finetune") -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", f"tune_train.recipes.{recipe}", "--config",
                           str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()


@pytest.mark.parametrize("extra,recipe,message", [
    ({"lora_rank": 0}, "lora_finetune", "error: lora_rank must be a positive integer, got 0"),
    ({"lora_target_modules": ["q", "q_proj"]}, "lora_finetune",
     "error: unknown LoRA target module 'q_proj' (did you mean 'q'?); choose from q, k, v, o, "
     "gate, up, down, output"),
    ({"lora_rank": None}, "lora_finetune",
     "error: lora_finetune trains LoRA adapters but lora_rank is not set; set lora_rank (e.g. "
     "8) and lora_target_modules, or run full_finetune to train every weight"),
    ({}, "full_finetune",
     "error: lora_rank is 4 but full_finetune trains every weight; run lora_finetune (tune run "
     "lora_finetune --config ...) to train adapters, or set lora_rank: null"),
    ({"lora_rank": None, "quantize_base": "nf4"}, "full_finetune",
     "error: 'quantize_base: nf4' stores the frozen base in 4 bits, and only LoRA leaves the "
     "base frozen: set lora_rank (e.g. 8) and run lora_finetune, or set quantize_base: null"),
    ({"quantize_base": "nf4", "dtype": "fp16"}, "lora_finetune",
     "error: quantize_base: nf4 computes in the model's dtype, and fp16 trains fp32 master "
     "weights under autocast; use dtype: bf16 on a GPU or fp32 on CPU"),
    ({"quantize_base": "nf4", "dtype": "bf16"}, "lora_finetune",
     "error: quantize_base: nf4 with dtype: bf16 on CPU dequantises every weight in bf16 on "
     "every step (~30x slower than fp32 here); use dtype: fp32 on CPU, bf16 on a GPU"),
])
def test_bad_lora_settings_are_one_line(demo_files, base, tmp_path, extra, recipe, message):
    out = tmp_path / "run"
    assert _error(_lora(demo_files, base, out, **extra), tmp_path, recipe) == [message]
    assert not (out / "checkpoints").exists()


def test_resuming_with_an_adapter_of_another_base_shape_is_one_line(demo_files, tmp_path):
    # Random bases (no model_checkpoint): the second run's model is wider than the first's.
    out = tmp_path / "run"
    cfg = tiny_config(demo_files, output_dir=str(out), model_args={"vocab_size": 64},
                      lora_rank=4, max_steps_per_epoch=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _finish(_start(path))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lines = _error({**cfg, "resume_from_checkpoint": True,
                    "model_args": {"vocab_size": 64, "dim": 128}}, tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: cannot resume from {out / 'checkpoints' / 'step_0000002'}")
    assert "another base model" in lines[0] or "shape" in lines[0], lines[0]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".tune.lock"}
    assert {p: b for p, b in before.items() if p.name != ".tune.lock"} == after
