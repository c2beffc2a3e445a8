"""`tune run` as people actually misuse it: two runs on one output_dir, an output_dir that is a
file, out-of-range numbers, a run that diverges, a log redirected to a file. Real processes,
one clear line each, and nothing the first run wrote is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tune_train.checkpointing import latest_checkpoint, list_checkpoints
from tune_train.metrics import read_jsonl_metrics

from train_helpers import make_demo_files, tiny_config

TUNE = str(Path(sys.executable).with_name("tune"))


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return make_demo_files(tmp_path_factory.mktemp("demo"), records=800)


def _config(demo_files, folder: Path, name: str, **extra) -> tuple[Path, Path]:
    out = folder / name
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(demo_files, **{"output_dir": str(out), **extra})))
    return path, out


def _start(*args: str, **popen) -> subprocess.Popen:
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([TUNE, *args], text=True, **popen)


def _tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _wait_for_metrics(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    """Until the run has logged a step: it holds output_dir by then."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no step"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- one run per dir
STEPS = 40


def test_a_second_run_on_the_same_output_dir_fails_at_once(demo_files, tmp_path):
    config, out = _config(demo_files, tmp_path, "shared", batch_size=2, max_steps_per_epoch=STEPS,
                          save_every_n_steps=20)
    first = _start("run", "full_finetune", "--config", str(config))
    _wait_for_metrics(first, out)
    # Paused mid-run (still holding output_dir, as a run between two steps does), so the
    # second run meets it however slow this machine is.
    first.send_signal(signal.SIGSTOP)
    try:
        second = _tune("run", "full_finetune", "--config", str(config), "seed=7")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0
    assert (out / ".tune.lock").read_text().split()[:2] == ["pid", str(first.pid)]
    assert _lines(second.stderr) == [
        f"error: output_dir {out} is in use by another training run (pid {first.pid} on "
        f"{os.uname().nodename}); wait for it to finish, or set another output_dir"]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    # The first run's record is whole and its own: every step once, its checkpoints, its seed.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in read_jsonl_metrics(out / "metrics.jsonl")] == \
        list(range(1, STEPS + 1))
    assert len(lines) == STEPS
    assert [p.name for p in list_checkpoints(out)] == ["step_0000020", "step_0000040"]
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 42


def test_a_killed_run_does_not_block_the_next(demo_files, tmp_path):
    config, out = _config(demo_files, tmp_path, "killed", batch_size=2,
                          max_steps_per_epoch=None, save_every_n_steps=100)
    first = _start("run", "full_finetune", "--config", str(config))
    _wait_for_metrics(first, out)
    first.send_signal(signal.SIGKILL)  # no chance to release anything: the OS drops the lock
    first.wait()
    again = _tune("run", "full_finetune", "--config", str(config), "max_steps_per_epoch=3",
                  "resume_from_checkpoint=True")
    assert again.returncode == 0, again.stderr[-3000:]
    assert latest_checkpoint(out).name == "step_0000003"


def _family(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in their own sessions)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    family = [pid]
    for member in family:
        family += [child for child, parent in parents.items() if parent == member]
    return family


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _rank(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"RANK=")), None)


def test_under_torchrun_rank_0_holds_output_dir(demo_files, tmp_path):
    config, out = _config(demo_files, tmp_path, "fsdp", batch_size=2, max_steps_per_epoch=None,
                          enable_fsdp=True)
    env = {**os.environ, "TUNE_DIST_TIMEOUT": "60"}
    torchrun = ["--standalone", "--nproc_per_node", "2", "full_finetune.py", "--config",
                str(config)]  # --standalone: each job on its own free port
    first = _start(*torchrun, env=env)
    job = [first.pid]
    try:
        _wait_for_metrics(first, out)
        job = _family(first.pid)
        assert len(job) >= 3, job  # the launcher, torchrun's agent, two ranks
        _signal_all(job, signal.SIGSTOP)  # the job holds output_dir however long we take
        holder = int((out / ".tune.lock").read_text().split()[1])
        assert _rank(holder) == "0"
        single = _tune("run", "full_finetune", "--config", str(config))
        assert single.returncode != 0
        assert _lines(single.stderr)[0].startswith(
            f"error: output_dir {out} is in use by another training run (pid {holder} on ")
        # A second job on the same folder: its rank 0 is refused, and its rank 1, which never
        # touches the lock, learns of it and stops too instead of waiting for rank 0.
        started = time.monotonic()
        second = subprocess.run([TUNE, *torchrun], capture_output=True, text=True,
                                timeout=300, env=env)
        assert second.returncode != 0
        assert time.monotonic() - started < 120, "the refused job did not stop promptly"
        assert second.stderr.count("is in use by another training run") == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None
    finally:
        _signal_all(job, signal.SIGKILL)
        first.wait()


# ----------------------------------------------------------------------------- ordinary mistakes
@pytest.mark.parametrize("args, message", [
    (["config", "validate", "{config}", "lr=nan"], "error: 'lr' must be a finite number, got nan"),
    (["config", "validate", "{config}", "weight_decay=-5"],
     "error: 'weight_decay' must be >= 0, got -5.0"),
    (["run", "full_finetune", "--config", "{config}", "min_lr_ratio=-3"],
     "error: 'min_lr_ratio' is the final lr as a fraction of lr and must be between 0 and 1, "
     "got -3.0"),
    (["config", "validate", "{config}", "validation_split=1.5"],
     "error: 'validation_split' is 1.5; as the fraction of the training records to hold out "
     "it must be between 0 and 1, e.g. 0.05 (or name a split, e.g. validation)"),
    (["run", "full_finetune", "--config", "{config}", "save_best=True"],
     "error: 'save_best' is set but there is no validation data; set validation_split: 0.05 "
     "(hold out 5% of the training records) or validation_data_files"),
])
def test_numbers_out_of_range_are_one_line(demo_files, tmp_path, args, message):
    config, out = _config(demo_files, tmp_path, "ranges")
    result = _tune(*[a.format(config=config) for a in args])
    assert result.returncode == 1
    assert _lines(result.stderr) == [message]
    assert not out.exists()


def test_output_dir_that_is_a_file_is_one_line(demo_files, tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("my notes\n")
    config, _ = _config(demo_files, tmp_path, "file", output_dir=str(path))
    result = _tune("run", "full_finetune", "--config", str(config))
    assert result.returncode == 1
    assert _lines(result.stderr) == [
        f"error: output_dir {path} is a file, not a folder; set output_dir to a folder (or "
        "move the file away)"]
    assert path.read_text() == "my notes\n"


def test_a_diverging_run_stops_with_one_line(demo_files, tmp_path):
    config, out = _config(demo_files, tmp_path, "diverge", lr=1e30, max_steps_per_epoch=5)
    result = _tune("run", "full_finetune", "--config", str(config))
    assert result.returncode == 1
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "error: training diverged at step 2: the loss is nan; no checkpoint was written."), lines
    assert list_checkpoints(out) == []


# ----------------------------------------------------------------------------- log files
def test_a_log_file_gets_metric_lines_not_progress_frames(demo_files, tmp_path):
    config, out = _config(demo_files, tmp_path, "logged", max_steps_per_epoch=4,
                          metric_loggers=["stdout", "jsonl"])
    log, err = tmp_path / "train.log", tmp_path / "train.err"
    with log.open("w") as stdout, err.open("w") as stderr:
        proc = _start("run", "full_finetune", "--config", str(config), stdout=stdout,
                      stderr=stderr)
        assert proc.wait(timeout=300) == 0, err.read_text()[-3000:]
    raw = log.read_bytes() + err.read_bytes()  # read_text() would turn each \r into \n
    assert b"\r" not in raw
    text = raw.decode()
    steps = [line.split(" |")[0] for line in log.read_text().splitlines()
             if line.startswith("step ")]
    assert steps == ["step 1", "step 2", "step 3", "step 4"]
    assert f"epoch 1 done: checkpoint {out / 'checkpoints' / 'step_0000004'}" in text
