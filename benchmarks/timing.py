"""The one timer the benchmarks share: wall seconds of a call (device synchronised), and best-of-N over several."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds ``fn()`` takes, waiting for queued CUDA work on ``device`` before and after."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def best_of(
    runs: Mapping[str, Callable[[], object]], repeats: int, device: torch.device | None = None
) -> dict[str, float]:
    """The least seconds each run took over ``repeats`` rounds (:func:`timed`).

    Rounds are interleaved (every run once, then again), so load from other processes on a shared
    machine hits every run alike, and the best of each is the least disturbed.
    """
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn, device))
    return best
