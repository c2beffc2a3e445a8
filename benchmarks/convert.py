"""Meta -> native conversion of a 7B-shaped checkpoint: wall time against `cp`, and peak memory.

    uv run python benchmarks/convert.py [--rounds 3] [--layers 32] [--workdir DIR] [--no-torchtune]

Writes a Llama-2-7B-shaped Meta checkpoint (consolidated.00.pth + params.json, random 16-bit
weights, 13.5 GB at 32 layers) into a temporary folder, then alternates, each round:

* ``cp`` of the same file, then fsync of the copy (``cp`` alone is printed too; the conversion
  fsyncs its output, so cp + fsync is the like-for-like figure);
* ``tune-ckpt convert`` as a user runs it: a fresh process, start-up included, writing
  native_pytorch_model.pt; its peak RSS (VmHWM) and peak anonymous memory (RssAnon) are
  sampled from /proc every 20 ms (wait4's ru_maxrss would count this parent's memory: Linux
  carries the high-water mark across fork and exec);
* the torchtune 0.6.1 peer when its venv exists ($TORCHTUNE_VENV, default
  benchmarks/.venv-torchtune): torch.load(mmap) + meta_to_tune + torch.save + fsync, timed
  inside its process (its ~9 s import excluded).

Every timed run starts from the same state: the source's pages are dropped from the page cache
(posix_fadvise DONTNEED on that file only) so each run reads it from disk, and the previous
run's output is deleted and the deletion committed (directory fsync, then a short pause) so
its clean-up does not land in the next run's time.

Prints medians (min, max) and the ratios last. Needs 40 GB free disk (input + one output);
skips with a message otherwise. Everything it writes is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from tune_ckpt.plan import TensorPlan
from tune_ckpt.writing import write_torch_file

from _timing import median, summary

GB = 1e9
LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
             "vocab_size": -1}
HERE = Path(__file__).resolve().parent

TORCHTUNE_RUNNER = """
import os, sys, time, torch
from torchtune.models.convert_weights import meta_to_tune
src, dst = sys.argv[1], sys.argv[2]
start = time.perf_counter()
sd = meta_to_tune(torch.load(src, mmap=True, weights_only=True))
torch.save(sd, dst)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(time.perf_counter() - start)
"""


def meta_plans(n_layers: int) -> list[TensorPlan]:
    """A Llama-2-7B Meta state dict (n_layers blocks) of random 16-bit values, made lazily."""
    dim, hidden, vocab = 4096, 11008, 32000
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,),
              "output.weight": (vocab, dim), "rope.freqs": (64,)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name, shape in [("attention.wq", (dim, dim)), ("attention.wk", (dim, dim)),
                            ("attention.wv", (dim, dim)), ("attention.wo", (dim, dim)),
                            ("feed_forward.w1", (hidden, dim)), ("feed_forward.w2", (dim, hidden)),
                            ("feed_forward.w3", (hidden, dim))]:
            shapes[f"{p}{name}.weight"] = shape
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    gen = torch.Generator().manual_seed(0)

    def random16(shape):
        return lambda: torch.randint(-(2**15), 2**15, shape, dtype=torch.int16,
                                     generator=gen).view(torch.bfloat16)

    return [TensorPlan(k, s, torch.bfloat16, random16(s)) for k, s in shapes.items()]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cold(src: Path) -> None:
    """Drop the source's cached pages so the next run reads it from disk."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a run's output and let the file system finish with it before the next run."""
    path.unlink()
    fsync(path.parent)
    time.sleep(1)


def run_cp(src: Path, dst: Path) -> tuple[float, float]:
    cold(src)
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    copied = time.perf_counter() - start
    fsync(dst)
    total = time.perf_counter() - start
    remove(dst)
    return copied, total


def run_ours(src: Path, out_dir: Path) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB), peak anonymous RSS (GB) of `tune-ckpt convert`."""
    script = Path(sys.executable).with_name("tune-ckpt")  # the console script users run
    cmd = [str(script), "convert", "--checkpoint-path", str(src),
           "--output-path", str(out_dir / "native_pytorch_model.pt"), "--quiet"]
    peak = {"VmHWM:": 0, "RssAnon:": 0}
    cold(src)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    fields = line.split()
                    if fields and fields[0] in peak:
                        peak[fields[0]] = max(peak[fields[0]], int(fields[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"tune-ckpt convert failed with exit code {code}")
    return wall, peak["VmHWM:"] / GB, peak["RssAnon:"] / GB


def run_torchtune(python: Path, src: Path, dst: Path) -> float:
    cold(src)
    out = subprocess.run([str(python), "-c", TORCHTUNE_RUNNER, str(src), str(dst)],
                         capture_output=True, text=True, check=True)
    remove(dst)
    return float(out.stdout.strip().splitlines()[-1])


def check_output(src: Path, native: Path, n_layers: int) -> None:
    """Spot-check the converted file against the source (outside the timings)."""
    a = torch.load(src, mmap=True, weights_only=True)
    b = torch.load(native, mmap=True, weights_only=True)
    last = f"layers.{n_layers - 1}."
    fused = torch.cat([a[last + "attention.wq.weight"], a[last + "attention.wk.weight"],
                       a[last + "attention.wv.weight"]])
    assert torch.equal(b[last + "attention.wqkv.weight"].view(torch.int16), fused.view(torch.int16))
    for key in ("tok_embeddings.weight", "output.weight", last + "feed_forward.w2.weight"):
        assert torch.equal(b[key].view(torch.int16), a[key].view(torch.int16)), key
    assert "rope.freqs" not in b and len(b) == 3 + 7 * n_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="32 = the full 7B shape")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--no-torchtune", action="store_true", help="skip the torchtune peer")
    args = parser.parse_args()

    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    plans = meta_plans(args.layers)
    size = sum(p.nbytes for p in plans)
    free = shutil.disk_usage(base).free
    if free < max(40 * GB, 2.5 * size):
        print(f"SKIP: {free / GB:.1f} GB free in {base}; this benchmark needs 40 GB "
              f"(a {size / GB:.1f} GB checkpoint and its copy)")
        return
    peer_venv = Path(os.environ.get("TORCHTUNE_VENV", HERE / ".venv-torchtune"))
    peer_python = peer_venv / "bin" / "python"
    peer = not args.no_torchtune and peer_python.is_file()
    if not args.no_torchtune and not peer:
        print(f"torchtune peer missing ({peer_python}); run benchmarks/setup_peers.sh or set "
              "TORCHTUNE_VENV. Continuing with cp only.")

    work = Path(tempfile.mkdtemp(prefix="tune-convert-bench-", dir=base))
    try:
        src_dir, out_dir = work / "llama-2-7b", work / "out"
        src_dir.mkdir()
        out_dir.mkdir()
        src = src_dir / "consolidated.00.pth"
        print(f"writing a {size / GB:.2f} GB Meta checkpoint ({args.layers} layers) to {src} ...",
              flush=True)
        write_torch_file(src, plans, progress=False)
        (src_dir / "params.json").write_text(json.dumps({**LLAMA2_7B, "n_layers": args.layers}))

        cp_only, cp_sync, ours, rss, anon, tt = [], [], [], [], [], []
        for r in range(args.rounds):
            copied, total = run_cp(src, work / "copy.pth")
            cp_only.append(copied)
            cp_sync.append(total)
            wall, peak, peak_anon = run_ours(src, out_dir)
            if r == 0:
                check_output(src, out_dir / "native_pytorch_model.pt", args.layers)
            remove(out_dir / "native_pytorch_model.pt")
            ours.append(wall)
            rss.append(peak)
            anon.append(peak_anon)
            if peer:
                tt.append(run_torchtune(peer_python, src, work / "torchtune.pt"))
            print(f"round {r + 1}: cp {copied:.1f} s, cp+fsync {total:.1f} s, tune-ckpt "
                  f"{wall:.1f} s (peak RSS {peak:.2f} GB, anon {peak_anon:.2f} GB)"
                  + (f", torchtune {tt[-1]:.1f} s" if peer else ""), flush=True)

        print(f"\n7B-shaped Meta checkpoint ({size / GB:.2f} GB, bf16) -> native, CPU, "
              f"{args.rounds} rounds, seconds:")
        print(f"  cp                         {summary(cp_only)}")
        print(f"  cp + fsync                 {summary(cp_sync)}")
        print(f"  tune-ckpt convert (CLI)    {summary(ours)}")
        if peer:
            print(f"  torchtune load+map+save    {summary(tt)}")
        print(f"  tune-ckpt peak RSS         {max(rss):.2f} GB; peak anonymous {max(anon):.2f} GB")
        print(f"  ratio tune-ckpt / (cp + fsync): {median(ours) / median(cp_sync):.2f}")
        print(f"  ratio tune-ckpt / cp:           {median(ours) / median(cp_only):.2f}")
        if peer:
            print(f"  ratio tune-ckpt / torchtune:    {median(ours) / median(tt):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
