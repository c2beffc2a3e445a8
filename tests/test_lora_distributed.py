"""lora_finetune under FSDP2 with real torchrun processes (CPU, gloo), launched the
tutorial's way: ``tune --nnodes 1 --nproc_per_node 2 lora_finetune.py --config my.yaml``.
Two processes give one process's losses on the same global batch, for LoRA and for QLoRA
(the NF4 base sharded), and a run resumes on another number of processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune_ckpt import load_peft_adapter
from tune_train.checkpointing import TrainingState, latest_checkpoint

from train_helpers import demo_start, read_losses, tune_run, write_run_config

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo data, tokenizer, and the base checkpoint every run starts from."""
    root = tmp_path_factory.mktemp("lora-dist")
    return root, *demo_start(root)


def _write_config(setup, name: str, **extra) -> tuple[Path, Path]:
    root, files, base, _ = setup
    lora = dict(max_steps_per_epoch=STEPS, lr=1e-2, lora_rank=4, lora_alpha=8.0,
                lora_target_modules=["q", "k", "v", "o", "gate", "up", "down", "output"])
    return write_run_config(root, files, base, name, **{**lora, **extra})


def _run(config: Path, nproc: int, *overrides: str) -> str:
    return tune_run("lora_finetune", config, nproc, *overrides)


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_two_processes_train_the_adapters_as_one(setup, nf4):
    """Same global batch (2 ranks x 2 samples x 2 micro-batches = 1 x 4 x 2)."""
    *_, config = setup
    quantize = {"quantize_base": "nf4"} if nf4 else {}
    tag = "q" if nf4 else "l"
    config1, out1 = _write_config(setup, f"one-{tag}", batch_size=4,
                                  gradient_accumulation_steps=2, **quantize)
    config2, out2 = _write_config(setup, f"two-{tag}", batch_size=2,
                                  gradient_accumulation_steps=2, **quantize)
    _run(config1, 1)
    log = _run(config2, 2)
    one, two = read_losses(out1), read_losses(out2)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert one[STEPS] < one[1]
    assert log.count("adapter (PEFT format)") == 1  # rank 0 writes it
    # Rank 0 gathered the sharded adapters into the same adapter one process trained.
    single, sharded = load_peft_adapter(out1, config), load_peft_adapter(out2, config)
    assert single.weights.keys() == sharded.weights.keys()
    for key, value in single.weights.items():
        torch.testing.assert_close(sharded.weights[key], value, atol=1e-4, rtol=1e-3, msg=key)
    assert sharded.quantize_base == ("nf4" if nf4 else None)
    assert not list(latest_checkpoint(out2).glob("native_pytorch_model.*"))


@pytest.mark.parametrize("before, after, nf4", [(2, 1, False), (1, 2, True)],
                         ids=["lora-2to1", "qlora-1to2"])
def test_resume_on_another_number_of_processes(setup, before, after, nf4):
    """Epoch 1 on one number of processes, epoch 2 resumed on another; the global batch stays
    4, so the losses follow a run that never stopped (the adapters' optimizer state is
    resharded; resumed on 2, each process puts its shards of the saved adapter in place)."""
    quantize = {"quantize_base": "nf4"} if nf4 else {}
    tag = f"{before}to{after}"
    reference_config, reference = _write_config(setup, f"ref-{tag}", epochs=2, batch_size=4,
                                                max_steps_per_epoch=3, **quantize)
    _run(reference_config, 1)
    config, out = _write_config(setup, f"switch-{tag}", epochs=1, batch_size=4 // before,
                                max_steps_per_epoch=3, **quantize)
    _run(config, before)
    assert TrainingState.read(latest_checkpoint(out)).world_size == before
    log = _run(config, after, "epochs=2", f"batch_size={4 // after}",
               "resume_from_checkpoint=True")
    assert "resumed from" in log
    expected, got = read_losses(reference), read_losses(out)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
