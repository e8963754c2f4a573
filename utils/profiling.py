"""Wall time per named stage and peak memory, for tools/benchmark.py.

On CUDA every stage edge synchronises the device, so a stage's time is its kernels' time.
Peak memory: CUDA max_memory_allocated; on the CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs where the kernel allows it, else the lifetime peak).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int | None:
    """A `field:` line of /proc/self/status (kB) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory since `reset()`: CUDA allocated bytes, or CPU resident set (VmHWM)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def current(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")


class StageTimer:
    """Wall time per named stage, summed within a step; synchronises the device at each edge.

    `stage(name)` is a context manager (the `span` that wetr.step.train_step takes); while
    `enabled` is False it only runs the block. Stages may nest: each is timed on its own.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.enabled = True

    def new_step(self) -> None:
        self.steps.append(defaultdict(float))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.steps[-1][name] += time.perf_counter() - t0

    def medians(self) -> dict[str, float]:
        names = list(dict.fromkeys(k for s in self.steps for k in s))
        return {k: statistics.median(s.get(k, 0.0) for s in self.steps) for k in names}


def timeit(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
