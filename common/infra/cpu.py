"""Threads for the cores that are actually free.

torch's intra-op threads wait for each other at every parallel region, spinning; when another process
holds a core, the threads that share it stall the rest: with one competing single-thread process on 2 cores,
a 2-thread extraction fell from ~2,000 to ~230 tokens/s. ``FreeCores`` watches how much CPU *other*
processes used since its last look (the machine's busy time from /proc/stat minus this process's own CPU
time) and sets torch's thread count to the cores left, so a loaded machine costs a share of the
throughput, not most of it (bench/bench_load.py).

Used where a long single-process computation may meet a competitor and its numbers do not need to be
bit-identical across thread counts (the activation extraction). Training keeps a fixed thread count:
its results must not depend on the machine's load; the E2/E3 scripts train in single-thread worker
processes, which do not spin.
"""
from __future__ import annotations

import os
import time

import torch


def _machine_busy_seconds() -> float | None:
    """Busy CPU time of the whole machine since boot (seconds, all cores), or None where /proc/stat is absent."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class FreeCores:
    """``update()``: set torch's thread count to the cores other processes left free since the last call.

    ``max_threads``: the most threads to use (default: the cores this process may run on). The first call
    only records a starting point (and keeps the current thread count)."""

    def __init__(self, max_threads: int | None = None, min_interval: float = 0.5):
        self.max_threads = max_threads or len(os.sched_getaffinity(0))
        self.min_interval = min_interval
        self._last = None
        self.threads = torch.get_num_threads()

    def update(self) -> int:
        now, busy, own = time.monotonic(), _machine_busy_seconds(), time.process_time()
        if busy is None:
            return self.threads
        if self._last is not None and now - self._last[0] >= self.min_interval:
            t0, busy0, own0 = self._last
            others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)  # cores used by other processes
            threads = max(1, min(self.max_threads, int(round(os.cpu_count() - others))))
            if threads != self.threads:
                torch.set_num_threads(threads)
                self.threads = threads
        if self._last is None or now - self._last[0] >= self.min_interval:
            self._last = (now, busy, own)
        return self.threads
