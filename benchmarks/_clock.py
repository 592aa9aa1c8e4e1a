"""The benchmarks' clock: (wall, process CPU) seconds, the wall clock read after a device synchronization on a GPU."""

from __future__ import annotations

import time
from typing import Callable

import torch


def clock(device: torch.device) -> Callable[[], tuple[float, float]]:
    """A function returning (wall, process CPU) seconds now; on a GPU it first waits for the device's queued work."""
    def now() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter(), time.process_time()

    return now
