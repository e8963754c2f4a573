"""Stage times from torch.profiler, wall time and peak memory, for tools/benchmark.py.

A stage is a labelled range (`torch.profiler.record_function`): the training step labels its
stages (wetr/step.py STAGES), which cost nothing when no profiler runs. Peak memory: CUDA
max_memory_allocated; on the CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs where the kernel allows it, else the lifetime peak).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity


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


def profiled(device: torch.device) -> torch.profiler.profile:
    """A torch.profiler session recording the CPU and, on CUDA, the kernels (no shapes, stacks
    or memory: only the times of the ranges)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return torch.profiler.profile(activities=activities)


def range_times(prof: torch.profiler.profile, names: Iterable[str], device: torch.device
                ) -> dict[str, float]:
    """Seconds of each labelled range (`torch.profiler.record_function`) in `names`, summed over
    its occurrences in the profile: on the CPU its time with its children's (self + child), on
    CUDA its kernels' time with its children's.

    On CUDA, autograd runs the backward kernels from its own thread, outside the caller's ranges:
    their time (the top-level ranges of other threads) is counted in a range named "backward".
    """
    names = set(names)
    cuda = device.type == "cuda"
    out: dict[str, float] = defaultdict(float)
    main_threads = set()
    for e in prof.events():
        if e.name in names and e.device_type == DeviceType.CPU:
            out[e.name] += (e.device_time_total if cuda else e.cpu_time_total) / 1e6
            main_threads.add(e.thread)
    if cuda and "backward" in names:
        out["backward"] += sum(e.device_time_total for e in prof.events()
                               if e.device_type == DeviceType.CPU and e.cpu_parent is None
                               and e.thread not in main_threads) / 1e6
    return dict(out)


def medians(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per name, the median over steps (0 in a step without it), in first-seen order."""
    names = list(dict.fromkeys(k for s in steps for k in s))
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in names}


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
