"""Metric loggers write what a user later reads: stdout lines, JSONL, TensorBoard events,
Weights & Biases runs (offline), and the loss-curve picture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tune_train.config import load_config
from tune_train.metrics import JsonlLogger, StdoutLogger, read_jsonl_metrics
from tune_train.plot import PlotError, plot_metrics
from tune_train.recipes import recipe_main_of


def test_every_logger_records_the_run(tiny_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "")  # offline: nothing leaves the machine
    cfg = tiny_run(metric_loggers=["stdout", "jsonl", "tensorboard", "wandb"],
                   wandb={"mode": "offline", "project": "tune-test"}, plot=True,
                   max_steps_per_epoch=5, log_every_n_steps=1, validation_split=0.05,
                   eval_every_n_steps=2)
    recipe_main_of("full_finetune")(load_config(cfg))
    out = Path(cfg["output_dir"])

    records = read_jsonl_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for key in ("loss", "lr", "tokens_per_second", "grad_norm", "peak_rss_gib"):
        assert all(isinstance(r[key], float) for r in records), key
    # Validation every 2 steps and at the epoch's end, in the same record as the step's
    # training metrics.
    validated = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(validated) == [2, 4, 5]
    assert all(r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
               for r in records if "val_loss" in r)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-6)

    assert [e.step for e in events.Scalars("val_loss")] == [2, 4, 5]
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx(
        list(validated.values()), rel=1e-6)

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))

    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "step 5 | epoch 1 | loss " in text and "tokens_per_second" in text
    assert f"| val_loss {validated[4]:.4f} | val_perplexity " in text
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_stdout_line_format():
    lines = []
    StdoutLogger(write=lines.append).log(
        {"epoch": 1.0, "loss": 2.345678, "lr": 2e-5, "tokens_per_second": 12345.6}, step=7)
    assert lines == ["step 7 | epoch 1 | loss 2.3457 | lr 2e-05 | tokens_per_second 12,346"]


def test_jsonl_survives_a_cut_line_and_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"loss": 3.0}, 1)
    logger.log({"loss": 2.0}, 2)
    logger.close()
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    logger = JsonlLogger(path)  # resumed from step 1
    logger.log({"loss": 2.5}, 2)
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl_metrics(path)] == [(1, 3.0), (2, 2.5)]


def test_plot_needs_metrics(tmp_path):
    with pytest.raises(PlotError, match="no metrics at"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PlotError, match="metrics.jsonl is empty: no training step has been "
                                        "logged yet"):
        plot_metrics(tmp_path)


@pytest.mark.parametrize("content, message", [
    # Each of these ended as a KeyError/TypeError/UnicodeDecodeError "unexpected error", or,
    # for a text loss, as a plot of categories.
    (b'{"step": 1, "loss": 2.0}\nnot json at all\n',
     "metrics.jsonl, line 2: 'not json at all' is not JSON"),
    (b'{"step": 1, "loss": 2.0}\n[1, 2]\n',
     r"metrics.jsonl, line 2: '\[1, 2\]' is not a metrics record \(a JSON object with an "
     "integer 'step'\\)"),
    (b'{"loss": 2.0}\n', "line 1: '{\"loss\": 2.0}' is not a metrics record"),
    (b'{"step": 1, "lr": 0.1}\n{"step": 2, "lr": 0.1}\n',
     "holds no loss values: none of its 2 records has a finite 'loss'"),
    (b'{"step": 1, "loss": "low"}\n', "step 1 has loss 'low', which is not a number"),
    (b'{"step": 1, "loss": 2.0, "val_loss": [2.1]}\n',
     r"step 1 has val_loss \[2.1\], which is not a number"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "metrics.jsonl is not a metrics file: byte 0 is not UTF-8"),
])
def test_malformed_metrics_get_a_message_naming_the_problem(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    with pytest.raises(PlotError, match=message):
        plot_metrics(tmp_path)
    assert not (tmp_path / "loss_curve.png").exists()


def _red_pixels(png: Path) -> int:
    import matplotlib.image

    rgb = matplotlib.image.imread(str(png))[..., :3]
    red = (0xD6 / 255, 0x27 / 255, 0x28 / 255)  # tab:red, the validation curve
    return int((abs(rgb - red).max(axis=-1) < 0.05).sum())


def test_plot_draws_validation_loss_beside_training_loss(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [f'{{"step": {s}, "loss": {4 - s / 10}, "lr": 0.001}}' for s in range(1, 21)]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert _red_pixels(plot_metrics(plain)) == 0  # a run without validation plots as before

    validated = tmp_path / "validated"
    validated.mkdir()
    # Validation at steps the training loss was not logged at is drawn too.
    lines += [f'{{"step": {s}, "val_loss": {4.2 - s / 12}}}' for s in (25, 30)]
    lines[9] = lines[9][:-1] + ', "val_loss": 3.5}'
    (validated / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert _red_pixels(plot_metrics(validated)) > 200
