"""The one timer the benchmarks share: wall seconds of a call, with the device synchronised."""

from __future__ import annotations

import time
from collections.abc import Callable

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
