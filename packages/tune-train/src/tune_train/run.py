"""What every recipe does around its loop: the checks before anything is built, the device and
processes, the output_dir lock, messages and metric loggers; and a recipe's command line.

A recipe script reads::

    def main(cfg: TrainConfig) -> None:
        with start_run(cfg, "full_finetune", lora=False) as run:
            ...  # build, then loop

    if __name__ == "__main__":
        sys.exit(recipe_main(main, __doc__))

:func:`start_run` refuses a config that cannot work before anything heavy happens (a typo'd
name, a missing file, a tokenizer or checkpoint of another model family, LoRA keys given to a
recipe that trains every weight, checkpoints of another recipe in output_dir), joins the
torchrun process group, picks the device and takes the output_dir lock. Leaving the ``with``
block closes the loggers, draws the loss curve, releases the lock and leaves the process group;
a step that stopped being finite (:class:`tune_train.steps.Diverged`) becomes one line naming
the step and the checkpoint that is still good.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from tune_train import checkpointing as ckpt
from tune_train.config import ConfigError, TrainConfig, dump_config, load_config
from tune_train.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    pick_device,
    shard_model,
)
from tune_train.errors import RecipeError, explain, user_errors
from tune_train.metrics import quiet_library_progress_bars
from tune_train.output_dir import OutputDirError, OutputDirLock, claim_output_dir
from tune_train.steps import Diverged

_warned: set[str] = set()


@dataclass
class Run:
    """One training run: its config, where it runs, and what it holds until it ends.

    Attributes:
        cfg: The checked config.
        recipe: The recipe running (recorded in every checkpoint).
        device: Where the model runs.
        dist: This process's place among the torchrun processes.
        sharded: Whether the model is sharded with FSDP2.
        resume_from: The checkpoint this run continues, or None.
    """

    cfg: TrainConfig
    recipe: str
    device: torch.device
    dist: DistInfo
    sharded: bool
    resume_from: Path | None = None
    lock: OutputDirLock | None = None
    loggers: Any = None
    _closed: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def param_dtype(self) -> torch.dtype:
        """The weights' dtype: bf16 trains bf16 weights; fp16 trains fp32 master weights."""
        return torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32

    def autocast(self) -> AbstractContextManager:
        """The forward's context: single-device fp16 runs the fp32 weights under autocast;
        under FSDP the mixed-precision policy does the casting instead."""
        if self.cfg.dtype == "fp16" and not self.sharded:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return nullcontext()

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 over this run's processes, with the config's mixed precision and offload."""
        fp16 = self.cfg.dtype == "fp16"
        shard_model(model, param_dtype=torch.float16 if fp16 else None,
                    reduce_dtype=torch.float32 if fp16 else None,
                    cpu_offload=self.cfg.fsdp_cpu_offload)

    def print(self, line: str) -> None:
        """Show a line (main process only), above the progress bar."""
        if self.is_main:
            tqdm.write(line)

    def warn(self, line: str) -> None:
        """Show a warning once (main process only)."""
        if self.is_main and line not in _warned:
            _warned.add(line)
            tqdm.write(f"warning: {line}")

    def barrier(self) -> None:
        if self.dist.distributed:
            dist.barrier()

    def on_main(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the main process only; if it fails there, every process stops with
        its message (instead of the others waiting for it until a timeout)."""
        error = None
        if self.is_main:
            try:
                work()
            except RecipeError as e:
                if not self.dist.distributed:
                    raise
                error = e
        if self.dist.distributed:
            message = [str(error) if error is not None else None]
            dist.broadcast_object_list(message, src=0)
            if error is not None:
                raise error
            if message[0] is not None:
                raise RecipeError(message[0])

    def start_logging(self) -> None:
        """Everything is built: write the run's config.yaml and open its metric loggers."""
        if not self.is_main:
            return
        from tune_ckpt import CheckpointError
        from tune_ckpt.writing import write_text_atomic

        try:  # a fresh file renamed into place: never written through a planted link
            write_text_atomic(self.output_dir / "config.yaml", dump_config(self.cfg))
        except CheckpointError as e:
            raise RecipeError(str(e)) from e
        self.loggers = _open_loggers(self.cfg, self.output_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if metrics and self.loggers is not None:
            self.loggers.log(metrics, step)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close()
        if isinstance(error, Diverged):
            raise RecipeError(self._diverged(error)) from error

    def _diverged(self, error: Diverged) -> str:
        latest = ckpt.latest_checkpoint(self.output_dir)
        kept = (f"the latest checkpoint, {latest}, is unchanged" if latest is not None
                else "no checkpoint was written")
        return (f"{error}; {kept}. Lower lr (now {self.cfg.lr:g}) or clip gradients "
                "(max_grad_norm), then resume with resume_from_checkpoint: True")

    def close(self) -> None:
        """Close the loggers and draw the loss curve, release output_dir, leave the group."""
        if self._closed:
            return
        self._closed = True
        if self.loggers is not None:
            self.loggers.close()
            if self.cfg.plot and "jsonl" in self.cfg.metric_loggers:
                from tune_train.plot import PlotError, plot_metrics

                try:
                    png = plot_metrics(self.output_dir / "metrics.jsonl")
                    tqdm.write(f"loss curve: {png}")
                except (PlotError, FileNotFoundError) as e:
                    tqdm.write(f"no loss curve drawn: {e}")
        if self.lock is not None:
            self.lock.release()
        cleanup_distributed()


def start_run(cfg: TrainConfig, recipe: str, *, lora: bool | None) -> Run:
    """Check a config, then set up the run it describes.

    Args:
        cfg: The config.
        recipe: The recipe about to run (its name: full_finetune, lora_finetune, ...).
        lora: True if the recipe trains LoRA adapters (lora_rank required), False if it
            trains every weight (LoRA keys refused), None if it does either.

    Returns:
        The run, holding output_dir; leave it by ``with`` (or call ``close``).

    Raises:
        ConfigError, RecipeError: One line for the first problem found.
    """
    from tune_train import registry
    from tune_train.config_checks import missing_files, model_problems, recipe_problem

    # Cheap checks first: a typo, or a tokenizer or checkpoint of another model family,
    # must not cost a model load.
    registry.lookup(registry.MODELS, cfg.model, "model")
    registry.lookup(registry.TOKENIZERS, cfg.tokenizer, "tokenizer")
    dataset_fn = registry.lookup(registry.DATASETS, cfg.dataset, "dataset")
    registry.lookup(registry.OPTIMIZERS, cfg.optimizer, "optimizer")
    registry.lookup(registry.LOSSES, cfg.loss, "loss")
    registry.dataset_arguments(dataset_fn, cfg)  # a wrong dataset_args key fails here
    problems = missing_files(cfg)
    if problems:
        raise RecipeError(problems[0])
    problem = recipe_problem(recipe, lora, cfg.lora_rank)
    if problem:
        raise ConfigError(problem)
    problems = model_problems(cfg)  # model_args, tokenizer and checkpoint vs the family
    if problems:
        raise ConfigError(problems[0])

    device = pick_device(cfg.device)
    info = init_distributed(device.type)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if cfg.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecipeError("this GPU has no bf16 support; use dtype: fp16 or fp32")
    torch.manual_seed(cfg.seed)
    if info.distributed and not cfg.enable_fsdp:
        raise RecipeError(f"{info.world_size} processes were launched but enable_fsdp is "
                          "False; set enable_fsdp: True (or launch one process)")
    run = Run(cfg, recipe, device, info, sharded=cfg.enable_fsdp and info.initialized)
    if cfg.enable_fsdp and not run.sharded:
        run.warn("enable_fsdp is on but the recipe was not launched by torchrun; running "
                 "unsharded (launch with --nproc_per_node N to shard)")
    if cfg.fsdp_cpu_offload and not run.sharded:
        run.warn("fsdp_cpu_offload only applies to FSDP: set enable_fsdp: True and launch "
                 "with torchrun (tune --nproc_per_node N ...)")
    # Nothing in output_dir is touched before this run holds it alone.
    try:
        run.on_main(lambda: _claim(run))
        run.resume_from = ckpt.resume_point(cfg.output_dir, recipe, cfg.resume_from_checkpoint)
    except BaseException:
        run.close()
        raise
    if cfg.resume_from_checkpoint and run.resume_from is None:
        run.print(f"resume_from_checkpoint: no checkpoint in {cfg.output_dir} yet, starting "
                  "from the beginning")
    return run


def _claim(run: Run) -> None:
    try:
        run.lock = claim_output_dir(run.cfg.output_dir)
    except OutputDirError as e:
        raise RecipeError(str(e)) from e
    problem = ckpt.checkpoint_root_problem(run.cfg.output_dir)
    if problem is not None:
        raise RecipeError(problem)
    ckpt.remove_partial_checkpoints(run.cfg.output_dir)


def _open_loggers(cfg: TrainConfig, out: Path):
    from tune_train import metrics

    loggers = []
    for name in cfg.metric_loggers:
        if name == "stdout":
            loggers.append(metrics.StdoutLogger(write=tqdm.write))
        elif name == "jsonl":
            loggers.append(metrics.JsonlLogger(out / "metrics.jsonl"))
        elif name == "tensorboard":
            loggers.append(metrics.TensorBoardLogger(out / "tensorboard"))
        elif name == "wandb":
            w = cfg.wandb
            loggers.append(metrics.WandbLogger(w.project, w.entity, w.mode, w.run_name, out,
                                               config=vars(cfg).copy()))
    return metrics.MetricLoggers(loggers)


def recipe_main(main: Callable[[TrainConfig], Any], description: str | None,
                argv: list[str] | None = None) -> int:
    """A recipe's command line: ``python recipe.py --config X [key=value ...] [--debug]``.

    Loads the config (a YAML file or built-in name, with overrides), runs ``main`` on it and
    turns an error a user can fix into one line on stderr and its exit status (``--debug``
    or TUNE_DEBUG=1: the traceback instead).

    Returns:
        The exit status.
    """
    summary = (description or "").strip().splitlines()[0] if description else None
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument("--config", help="YAML file or built-in config name (default: none, "
                        "only defaults and overrides)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("TUNE_DEBUG") == "1"
    quiet_library_progress_bars()
    try:
        main(load_config(args.config, args.overrides))
    except (KeyboardInterrupt, *user_errors()) as e:
        if debug and not isinstance(e, KeyboardInterrupt):
            raise
        message, status = explain(e)
        _report(message)
        return status
    except Exception as e:
        if debug or not _lost_a_peer(e):
            raise
        # Another rank died (killed, out of memory, node lost): torchrun stops the job; a
        # traceback from every survivor would only bury the cause.
        _report(f"lost contact with another training process ({str(e).splitlines()[0][:200]})")
        return 1
    return 0


def _report(message: str) -> None:
    # Every process hits the same config mistake: one line per node, from its first process.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if rank != "0" else ""
        print(f"{prefix}error: {message}", file=sys.stderr)


def _lost_a_peer(error: Exception) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer",
                                  "gloo", "NCCL", "Broken pipe"))
