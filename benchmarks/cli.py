"""Start-up time of `tune --help`: ours vs torchtune 0.6.1's, alternating, whole processes.

    uv run python benchmarks/cli.py [--rounds 7]

"cold" drops the page cache before each run (needs root; skipped otherwise), so files are read
from disk as on a first call after boot; "warm" runs again right after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from _timing import median, summary

HERE = Path(__file__).resolve().parent
TORCHTUNE_VENV = Path(os.environ.get("TORCHTUNE_VENV", HERE / ".venv-torchtune"))


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    peer = TORCHTUNE_VENV / "bin" / "tune"
    if not peer.exists():
        sys.exit(f"torchtune peer missing at {TORCHTUNE_VENV}: run benchmarks/setup_peers.sh")
    commands = {"tune": [str(Path(sys.executable).with_name("tune")), "--help"],
                "torchtune": [str(peer), "--help"]}
    can_drop = drop_caches()
    results = {f"{k} {mode}": [] for k in commands for mode in ("cold", "warm")}
    for _ in range(args.rounds):
        for name, argv in commands.items():
            if can_drop:
                drop_caches()
                results[f"{name} cold"].append(timed(argv))
            results[f"{name} warm"].append(timed(argv))
    for name, values in results.items():
        if values:
            print(f"  {name:16s} seconds {summary(values, 3)}")
    mode = "cold" if can_drop else "warm"
    print(f"`tune --help` ({mode}): tune {median(results[f'tune {mode}']):.3f} s, torchtune "
          f"{median(results[f'torchtune {mode}']):.3f} s, ratio "
          f"{median(results[f'tune {mode}']) / median(results[f'torchtune {mode}']):.3f}")


if __name__ == "__main__":
    main()
