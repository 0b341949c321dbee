"""Timing helpers shared by the benchmarks: warm-up, then the median of repeated runs."""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Callable


def sample_seconds(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> list[float]:
    """`warmup` untimed calls, then the wall-clock seconds of `repeats` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    return statistics.median(sample_seconds(fn, repeats, warmup))


def median_p90(times: list[float]) -> dict:
    """{"median_s", "p90_s", "n"} of a list of seconds (p90: the nearest rank below)."""
    times = sorted(times)
    return {"median_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))], "n": len(times)}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Time several contenders in alternation, so drifting machine load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# -- CPU memory (Linux /proc) ------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the process's peak RSS afresh (Linux), so what came before is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_rss_added(fn: Callable[[], object]) -> int:
    """Bytes the process's peak RSS rose above its RSS just before one call of fn: that
    call's working memory. Freed memory is first handed back to the system (malloc_trim), so
    what an earlier call left in the allocator's free lists does not hide this one's."""
    from blip2lab.training.loop import release_free_memory

    gc.collect()
    release_free_memory()
    before = rss_bytes()
    reset_peak_rss()
    fn()
    return peak_rss_bytes() - before
