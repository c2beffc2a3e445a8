"""Quick training runs for tests: the demo's generated data and tokenizer, a tiny model."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any


def make_demo_files(folder: Path, records: int = 600) -> dict[str, Path]:
    """The demo's tokenizer (64 pieces) and task records, generated into folder."""
    from tune_data.demo import train_demo_tokenizer, write_demo_data

    return {
        "tokenizer": train_demo_tokenizer(folder / "tokenizer.model"),
        "data": write_demo_data(folder / "data.jsonl", n=records),
    }


def tiny_config(demo_files: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """Config keys for a tiny CPU run of a few steps; ``extra`` overrides any of them."""
    cfg: dict[str, Any] = {
        "dataset": "demo",
        "dataset_source": str(demo_files["data"]),
        "model": "llama2_tiny",
        "model_checkpoint": None,
        "tokenizer": "llama2_tokenizer",
        "tokenizer_checkpoint": str(demo_files["tokenizer"]),
        "max_seq_len": 32,
        "batch_size": 8,
        "lr": 3e-3,
        "epochs": 1,
        "optimizer": "AdamW",
        "device": "cpu",
        "dtype": "fp32",
        "metric_loggers": ["jsonl"],
        "plot": False,
        "max_steps_per_epoch": 6,
    }
    cfg.update(extra)
    return cfg


def run_recipe(cfg: dict[str, Any], recipe: str = "full_finetune") -> Any:
    """Run a recipe in this process on a config dict, as ``tune run`` would run it.

    Returns:
        The checked config (a ``TrainConfig``): the run's output_dir holds what it did.
    """
    from tune_train.config import load_config
    from tune_train.recipes import recipe_main_of

    config = load_config(cfg)
    recipe_main_of(recipe)(config)
    return config


@contextmanager
def started_run(cfg: dict[str, Any], recipe: str = "full_finetune", lora: bool | None = False):
    """The run a recipe starts for a config dict (checks, device, output_dir lock), closed on
    leaving: for tests of what a recipe builds before its loop."""
    from tune_train.config import load_config
    from tune_train.run import start_run

    with start_run(load_config(cfg), recipe, lora=lora) as run:
        yield run


def recipe_model(cfg: dict[str, Any], lora: bool = False):
    """The model a recipe trains for a config dict, built as the recipe builds it (from
    model_checkpoint, or random weights; with the config's adapters when ``lora``).

    Returns:
        (model, its DecoderConfig)
    """
    from tune_train.lora import lora_settings_of
    from tune_train.setup import build_tokenizer, model_config, training_model

    recipe = "lora_finetune" if lora else "full_finetune"
    with started_run(cfg, recipe, lora=lora) as run:
        config = model_config(run.cfg, build_tokenizer(run.cfg))
        settings = lora_settings_of(run.cfg, config) if lora else None
        return training_model(run.cfg, run, config, run.cfg.model_checkpoint,
                              lora=settings), config


def recipe_data(cfg: dict[str, Any]):
    """The TrainingData a recipe iterates over for a config dict (training and validation
    samples, sampler), built as the recipe builds it."""
    from tune_train.data import training_data
    from tune_train.setup import build_tokenizer

    with started_run(cfg) as run:
        return training_data(run.cfg, build_tokenizer(run.cfg), run)


def read_losses(output_dir: str | Path) -> dict[int, float]:
    """Step -> training loss, from a run's metrics.jsonl."""
    from tune_train.metrics import read_jsonl_metrics

    return {r["step"]: r["loss"] for r in read_jsonl_metrics(Path(output_dir) / "metrics.jsonl")}


def save_tiny_base(folder: Path, seed: int = 0):
    """A seeded llama2_tiny (64-token vocabulary) native checkpoint in ``folder``/start:
    the one starting point every run of a comparison loads.

    Returns:
        (checkpoint path, the model's DecoderConfig)
    """
    import torch

    from tune_ckpt import save_native
    from tune_models import Decoder, llama2_tiny

    torch.manual_seed(seed)
    config = llama2_tiny(vocab_size=64)
    model = Decoder(config)
    model.init_weights()
    path = folder / "start" / "native_pytorch_model.pt"
    path.parent.mkdir(parents=True)
    save_native(model.state_dict(), path, model_args=config, family="llama2")
    return path, config


def demo_start(root: Path):
    """What a comparison of runs shares: the demo files and a seeded start checkpoint.

    Returns:
        (demo files, checkpoint path, the model's DecoderConfig)
    """
    files = make_demo_files(root)
    start, config = save_tiny_base(root)
    return files, start, config


def tune_launch(recipe: str, config: Path, nproc: int, *overrides: str):
    """``tune --nnodes 1 --nproc_per_node N <recipe>.py --config C ...`` as a user types it."""
    import os
    import subprocess
    import sys

    tune = str(Path(sys.executable).with_name("tune"))
    return subprocess.Popen(
        [tune, "--nnodes", "1", "--nproc_per_node", str(nproc), f"{recipe}.py", "--config",
         str(config), *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TUNE_DIST_TIMEOUT": "60"})


def tune_run(recipe: str, config: Path, nproc: int, *overrides: str, timeout: int = 600) -> str:
    """:func:`tune_launch`, waited for; it must succeed. Returns stdout + stderr."""
    proc = tune_launch(recipe, config, nproc, *overrides)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def torchrun_script(folder: Path, script: str, nproc: int, *args: str) -> str:
    """Run a Python script under ``torchrun --nproc_per_node N``; it must succeed.

    Returns:
        Its stdout.
    """
    import subprocess
    import sys

    path = folder / "torchrun_script.py"
    path.write_text(script)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--nnodes", "1", "--nproc_per_node", str(nproc), str(path),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def write_run_config(root: Path, demo_files: dict[str, Path], start: Path, name: str,
                     **extra: Any) -> tuple[Path, Path]:
    """root/<name>.yaml for a tune --nproc_per_node run from checkpoint ``start``: FSDP and
    activation checkpointing on, AdamW, output in root/<name>; ``extra`` overrides any key.

    Returns:
        (the YAML file, the run's output_dir)
    """
    import yaml

    out = root / name
    settings = dict(output_dir=str(out), model_checkpoint=str(start),
                    model_args={"vocab_size": 64}, enable_fsdp=True,
                    enable_activation_checkpointing=True, optimizer="AdamW")
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(demo_files, **{**settings, **extra})))
    return path, out
