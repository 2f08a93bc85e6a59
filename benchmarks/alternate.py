"""The CPU micro-benchmarks' shared loop: several ways of one computation timed alternately in one
process, so the machine's drift hits all of them (`bench_residual.py`, `bench_loss.py`)."""

from __future__ import annotations

import time
from typing import Callable

from nmt import runtime


def setup_cpu(threads: int) -> None:
    """As `nmt train` runs on CPU: denormals flushed, `threads` threads, freed memory kept for reuse."""
    runtime.setup("cpu", "float32", threads)
    runtime.keep_freed_memory()


def time_alternately(ways: dict[str, Callable[[], None]], rounds: int, after: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each way over `rounds` rounds (each round calls every way once, then
    `after`), less the first eighth: those rounds warm the allocator, the caches and oneDNN's kernels."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - t0)
            after()
    return {name: t[len(t) // 8:] for name, t in times.items()}

