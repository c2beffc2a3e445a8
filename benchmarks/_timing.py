"""Shared helpers: alternate ours and the peer (A B A B ...) and report medians and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(runs: dict[str, Callable[[], float]], rounds: int = 3) -> dict[str, list[float]]:
    """Call each runner once per round, in turn; each returns a figure (higher is better)."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def summary(values: list[float], digits: int = 1) -> str:
    mid, low, high = statistics.median(values), min(values), max(values)
    return f"median {mid:,.{digits}f} (min {low:,.{digits}f}, max {high:,.{digits}f})"


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
