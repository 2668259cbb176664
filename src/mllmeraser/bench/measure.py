"""Cost measurements shared by `compare` and the benchmarks: wall time, peak memory, generation overhead."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

_PAGE = os.sysconf("SC_PAGE_SIZE")


# The process's memory is read here and nowhere else, with the standard library: psutil is no dependency of
# mllmeraser (it comes with accelerate, an extra), and resource.getrusage gives the peak only, not the
# current resident set that `measured` samples.
def rss_bytes() -> int:
    """This process's resident set now, in bytes (Linux: the second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    """This process's peak resident set so far, in bytes (getrusage's ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Cost:
    seconds: float = 0.0
    peak_extra_mib: float = 0.0  # resident memory above the level at the start of the block


@contextmanager
def measured(interval: float = 0.02) -> Iterator[Cost]:
    """Time a block and sample resident memory in a background thread (torch's CPU allocations included,
    which tracemalloc would miss)."""
    cost = Cost()
    start_rss = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(interval):
            peak = max(peak, rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - started
        done.set()
        thread.join()
        cost.peak_extra_mib = (max(peak, rss_bytes()) - start_rss) / 2**20


def overhead_ratio(baseline: Callable[[], object], treated: Callable[[], object], repeats: int = 5,
                   context: Callable[[], ContextManager] | None = None) -> tuple[float, float, float]:
    """(treated/baseline ratio of median times, median baseline s, median treated s), the two interleaved
    in one run so drifts in machine load hit both alike. One untimed warm-up each. `context` (e.g. attaching
    an eraser) is entered and left outside the timed region: the ratio is the steady-state cost."""
    context = context or nullcontext
    baseline()
    with context():
        treated()
    base_times, treated_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        baseline()
        base_times.append(time.perf_counter() - started)
        with context():
            started = time.perf_counter()
            treated()
            treated_times.append(time.perf_counter() - started)
    base, treat = statistics.median(base_times), statistics.median(treated_times)
    return treat / base, base, treat
