"""What every benchmark script shares: timing, percentiles, table cells and the JSON of results (no torch here)."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


MALLOC_TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
"""GLIBC_TUNABLES that keep big freed buffers in the heap: with glibc's defaults a fresh process can mmap and
munmap (and page-fault) the conv workspaces of every large batch; see bench/README.md."""


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of ``repeats`` timed calls (after ``warmup`` untimed ones)."""

    median: float
    minimum: float
    repeats: int

    def per_second(self, items: int) -> float:
        return items / self.median if self.median > 0 else math.inf


def measure(
    fn: Callable[[], object],
    *,
    min_time: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 200,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn``: ``warmup`` calls, then timed calls until both ``min_repeats`` calls and
    ``min_time`` seconds are done (at most ``max_repeats`` calls); median seconds per call."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < min_time):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), len(times))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` with linear interpolation between closest ranks
    (numpy's default 'linear' method); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell ('-' when absent or not finite)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def write_results(path: Path | None, results: dict[str, Any]) -> None:
    """Write every figure of a run as JSON to ``path`` (``--json``; nothing when None)."""
    if path is None:
        return
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
