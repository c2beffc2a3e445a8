"""Loss (training and validation) and learning-rate curves from metrics.jsonl, drawn to a
PNG."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tune_train.errors import PlotError
from tune_train.metrics import read_jsonl_metrics

__all__ = ["PlotError", "plot_metrics"]


def plot_metrics(metrics_path: str | Path, png_path: str | Path | None = None,
                 title: str | None = None) -> Path:
    """Draw the training loss (with a smoothed line), the validation loss where the run
    validated, and the learning rate against step.

    Args:
        metrics_path: A metrics.jsonl, or the output_dir holding one.
        png_path: Where to write the picture; default loss_curve.png beside the metrics.
        title: Figure title; default the output folder's name.

    Returns:
        The PNG's path.

    Raises:
        PlotError: When matplotlib is missing, there is nothing to draw, or the metrics file
            is not one tune wrote.
    """
    metrics_path = Path(metrics_path)
    if metrics_path.is_dir():
        metrics_path = metrics_path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise PlotError(f"no metrics at {metrics_path}; train with metric_loggers including "
                        "jsonl first")
    try:
        every_record = read_jsonl_metrics(metrics_path)
    except ValueError as e:
        raise PlotError(str(e)) from e
    if not every_record:
        raise PlotError(f"{metrics_path} is empty: no training step has been logged yet (a "
                        "line is written after every optimizer step)")
    records = [r for r in every_record if r.get("loss") is not None]
    if not records:
        raise PlotError(f"{metrics_path} holds no loss values: none of its {len(every_record)} "
                        "records has a finite 'loss'")
    validated = [r for r in every_record if r.get("val_loss") is not None]
    for key, chosen in (("loss", records), ("val_loss", validated)):
        for record in chosen:
            value = record[key]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise PlotError(f"{metrics_path}: step {record['step']} has {key} {value!r}, "
                                "which is not a number")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError("plotting needs matplotlib: pip install 'tune-train[plot]'") from e

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    many = len(losses) >= 10
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35 if many else 1.0, linewidth=1,
                 marker=None if many else "o", label="training loss")
    if many:
        # A centred moving average over ~1/20 of the run shows the trend through per-batch
        # noise without lagging behind it (an EMA drawn late in the run sits above the curve).
        half = max(1, len(losses) // 40)
        smooth = [sum(losses[max(0, i - half): i + half + 1])
                  / len(losses[max(0, i - half): i + half + 1]) for i in range(len(losses))]
        ax_loss.plot(steps, smooth, color="tab:blue", linewidth=2,
                     label=f"training loss (mean of {2 * half + 1} points)")
    if validated:
        # Few points, each over the whole validation set: drawn as they are, with markers.
        ax_loss.plot([r["step"] for r in validated], [r["val_loss"] for r in validated],
                     color="tab:red", linewidth=2, marker="o", markersize=5,
                     label="validation loss")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    lrs = [r.get("lr") for r in records]
    if any(v is not None for v in lrs):
        ax_lr.plot(steps, lrs, color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    ax_loss.set_title(title or metrics_path.parent.name)
    fig.tight_layout()
    png_path = Path(png_path) if png_path else metrics_path.parent / "loss_curve.png"
    if png_path.exists() and not png_path.is_file():
        plt.close(fig)
        # The picture replaces its output whole (a rename), which must never take the place
        # of a folder, a device or a pipe.
        raise PlotError(f"{png_path} exists and is not a regular file; pass --output "
                        "path/to/loss_curve.png")
    tmp = None
    try:
        # A fresh file of our own (O_EXCL), never one a link planted beside the picture names;
        # the rename then replaces whatever stands at png_path (a link too) whole.
        fd, name = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".tmp",
                                    dir=png_path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=100, format="png")
        os.chmod(tmp, 0o644)
        tmp.replace(png_path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half picture behind
        if isinstance(e, OSError) and e.filename is None:  # matplotlib's writer names no file
            raise OSError(e.errno, e.strerror, str(png_path)) from e
        raise
    finally:
        plt.close(fig)
    return png_path
