"""Metric loggers: stdout, JSONL, TensorBoard and Weights & Biases, combinable; and the
progress of an epoch, as a bar on a terminal or as plain lines in a log file.

Each logger takes ``log(metrics: dict, step: int)`` and ``close()``. Only rank 0 builds them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

# Where stderr is not a terminal, at most one progress line this often (seconds).
PLAIN_PROGRESS_SECONDS = 30.0


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


_FORMATS = {
    "epoch": "{:.0f}", "loss": "{:.4f}", "lr": "{:.3g}", "grad_norm": "{:.3f}",
    "tokens_per_second": "{:,.0f}", "peak_memory_gib": "{:.2f}", "peak_rss_gib": "{:.2f}",
    "loss_scale": "{:.0f}", "skipped_step": "{:.0f}", "val_loss": "{:.4f}",
    "val_perplexity": "{:.3f}",
}


class StdoutLogger:
    """One line per logged step: step, loss, lr, tokens/s, peak memory."""

    def __init__(self, write=print):
        self._write = write

    def log(self, metrics: dict[str, float], step: int) -> None:
        parts = [f"step {step}"]
        for key, value in metrics.items():
            parts.append(f"{key} {_FORMATS.get(key, '{:.4g}').format(value)}")
        self._write(" | ".join(parts))

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` (read by ``tune plot``).

    Resumed runs append to the same file: entries at or past the resume step are superseded
    by the ones logged after the resume, so readers keep the last entry of each step.
    """

    def __init__(self, path: str | Path):
        from tune_train.errors import RecipeError
        from tune_train.output_dir import OutputDirError, open_regular

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link planted at the name (output_dir may be in /tmp)
            fd = open_regular(self.path, os.O_RDWR | os.O_APPEND)
        except OutputDirError as e:
            raise RecipeError(str(e)) from e
        # A kill can cut the last line short; start on a fresh line so it stays the only loss.
        size = os.fstat(fd).st_size
        cut = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        self._file = os.fdopen(fd, "a", buffering=1)
        if cut:
            self._file.write("\n")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_jsonl_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, one per step (the last one wins after a resume), by step.

    A line cut short by a kill is skipped; anything else that is not a record of
    :class:`JsonlLogger` means the file is not what it should be.

    Raises:
        ValueError: If the file is not UTF-8 text, or a line is neither a JSON object with an
            integer ``step`` nor the beginning of one; the message names the line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a metrics file: byte {e.start} is not UTF-8 text "
                         "(metrics.jsonl holds one JSON object per line)") from None
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.startswith(_RECORD_START) or _RECORD_START.startswith(line):
                continue  # a line cut short by a kill: skip it, keep the rest
            raise ValueError(f"{path}, line {number}: {_shorten(line)} is not JSON "
                             "(metrics.jsonl holds one JSON object per line)") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{path}, line {number}: {_shorten(line)} is not a metrics record "
                             "(a JSON object with an integer 'step')")
        by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


# How every JsonlLogger line begins (json.dumps puts "step" first).
_RECORD_START = '{"step": '


def _shorten(line: str, limit: int = 40) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


class TensorBoardLogger:
    """Scalars in TensorBoard event files under ``<output_dir>/tensorboard``."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "metric logger 'tensorboard' needs the tensorboard package: "
                "pip install 'tune-train[tensorboard]'"
            ) from e
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Weights & Biases run; the config is logged once (it holds no secrets)."""

    def __init__(self, project: str, entity: str | None, mode: str, run_name: str | None,
                 output_dir: str | Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "metric logger 'wandb' needs the wandb package: pip install 'tune-train[wandb]'"
            ) from e
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(project=project, entity=entity, mode=mode, name=run_name,
                               dir=str(output_dir), config=config, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricLoggers:
    """Fans each call out to every configured logger."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class StepProgress:
    """Progress through an epoch: tqdm's bar on a terminal. In a log file (``tune run ... >
    train.log 2>&1``) every redraw of a bar is one more ``\\r`` frame, so there it prints a
    plain line at most every PLAIN_PROGRESS_SECONDS instead.

    Args:
        total: Steps in the epoch.
        initial: Steps already done (a resumed epoch).
        desc: What is running, e.g. ``epoch 1/2``.
        show: False on every process but the one that reports (rank 0).
        unit: What is counted (``step``; ``batch`` for validation).
        leave: Keep the finished bar on the terminal (False: a short pass such as
            validation clears its bar when done).
    """

    def __init__(self, total: int, initial: int, desc: str, show: bool = True,
                 unit: str = "step", leave: bool = True):
        self.total, self.initial, self.n, self.desc = total, initial, initial, desc
        self.unit = unit
        self.lines = show and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                        dynamic_ncols=True, disable=not show or self.lines)
        self.start = self.last_line = time.monotonic()

    def update(self, loss: float | None = None) -> None:
        """One more step done, with its loss if there is one to show."""
        self.n += 1
        self.bar.update(1)
        postfix = "" if loss is None else f"loss={loss:.4f}"
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
        now = time.monotonic()
        if self.lines and now - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self.last_line = now
            tqdm.write(tqdm.format_meter(
                self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                initial=self.initial, postfix=postfix,
                bar_format="{desc}: " + self.unit + " {n_fmt}/{total_fmt} ({percentage:.0f}%), "
                           "{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}"))

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Tokens per second of training since the last reading; time spent elsewhere (a
    validation pass) is left out with :meth:`pause`."""

    def __init__(self):
        self.tokens, self.start = 0.0, time.perf_counter()

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def read(self) -> float:
        """Tokens per second since the last reading (or the start); starts a new interval."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0.0, now
        return rate

    def pause(self):
        """A context in which time does not count (tokens/s measures training only)."""
        return _Paused(self)


class _Paused:
    def __init__(self, throughput: Throughput):
        self.throughput = throughput

    def __enter__(self) -> None:
        self.began = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.throughput.start += time.perf_counter() - self.began


def step_metrics(*, epoch: int, loss: float, lr: float, grad_norm: float, stepped: bool,
                 tokens_per_second: float, loss_scaler: Any = None,
                 device: Any = None) -> dict[str, float]:
    """The metrics of an optimizer step: what the stdout line, metrics.jsonl, TensorBoard and
    W&B record (and ``tune plot`` draws).

    Args:
        epoch: The epoch in progress (0-based; recorded 1-based).
        loss: The step's loss per target token.
        lr: Its learning rate.
        grad_norm: The gradient norm before clipping.
        stepped: Whether the optimizer stepped (fp16 skips overflowing steps).
        tokens_per_second: Training throughput since the last logged step.
        loss_scaler: fp16's loss scaler (its scale and the skip are recorded), or None.
        device: The model's device: a GPU's peak memory, else the process's peak RSS.
    """
    import resource

    import torch

    metrics = {"epoch": float(epoch + 1), "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_second": tokens_per_second}
    if loss_scaler is not None:
        metrics["loss_scale"] = loss_scaler.scale
        metrics["skipped_step"] = float(not stepped)
    if device is not None and torch.device(device).type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        # ru_maxrss is in KiB on Linux: the process's peak resident memory.
        metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def quiet_library_progress_bars() -> None:
    """Turn off the progress bars of tqdm's users (datasets, huggingface_hub, ...) for this
    process and its children when stderr is a log file, not a terminal: there every redraw
    would be one more ``\\r`` frame. Call it before those libraries are imported."""
    if not sys.stderr.isatty():
        for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                     "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")
