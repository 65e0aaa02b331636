"""Timing on a shared machine: torch.utils.benchmark measures each call (it synchronises CUDA), and every
contestant is measured once per round, in alternating order, so a machine that slows down or speeds up
between rounds moves all of them alike; figures are medians over rounds with their spread."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils import benchmark


def make_timer(fn: Callable[[], object]) -> benchmark.Timer:
    # Timer defaults to one thread; we measure with the threads the process really trains with.
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def sustained_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call over at least `min_run_time` seconds of back-to-back calls (after one warm-up)."""
    fn()
    return make_timer(fn).blocked_autorange(min_run_time=min_run_time).median


def rate_per_round(fn: Callable[[], object], items: int, warmup: int, block_s: float) -> Callable[[], float]:
    """Warm `fn` up now and return a measurement of items per second for one round: one block of calls
    lasting about `block_s` seconds (at least one call)."""
    for _ in range(warmup):
        fn()
    timer = make_timer(fn)
    number = max(1, round(block_s / timer.timeit(1).median))
    return lambda: items / timer.timeit(number).median


def interleaved(contestants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each contestant's figure once per round; odd rounds run in reverse order."""
    results = {name: [] for name in contestants}
    for r in range(rounds):
        for name in (list(contestants) if r % 2 == 0 else list(reversed(contestants))):
            results[name].append(contestants[name]())
    return results


def spread(values: list[float]) -> dict:
    """Median and interquartile range of per-round figures, with the extremes and the figures themselves."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": float(q3 - q1), "min": float(min(values)), "max": float(max(values)),
            "rounds": [float(v) for v in values]}


def paired_ratio(numerators: list[float], denominators: list[float]) -> dict:
    """Spread of round-by-round ratios: each pair was measured side by side, so drift between rounds cancels."""
    return spread([a / b for a, b in zip(numerators, denominators, strict=True)])
