"""``tune_process(settings)``: the process-wide settings the service is measured with.

``create_app`` applies them, so every way of starting the app (``python -m service``, an
ASGI host mounting ``create_app``, the tests) runs in the same mode. Each is measured in
bench/README.md ("Findings"):

- **Switch interval 0.5 ms** (Python's default is 5 ms). The model thread takes the GIL
  back after every tensor op; beside an event loop busy parsing HTTP it was starved 4-8x
  at 5 ms, 2.4-2.6x at 0.5 ms.
- **glibc's mmap and trim thresholds pinned** (32 MiB, 64 MiB), what
  ``MALLOC_MMAP_THRESHOLD_`` would do. glibc adapts the mmap threshold at run time, so
  torch's per-batch buffers (a few MB at batch 64) were either reused from the heap or
  mapped, unmapped and page-faulted on every batch, depending on allocation history:
  batch-64 scoring took 1.4-3x longer in some starts.
- **torch intra-op threads** = ``settings.threads``, or for 0 the usable cores less one
  (of ``--workers`` processes, each's share of them less one), which the event loop keeps (the thread sweep: a second thread at batch 1 made every
  form bimodal, 145-666 img/s, and beside busy cores it crawled).

All three are process-wide: calling again sets the same values (idempotent), and when one
process builds several apps the last one's thread count stands.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from service.settings import Settings

SWITCH_INTERVAL_S = 0.0005
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 CPU quota: "<quota> <period>" or "max <period>"
# cgroup v1 CPU quota (Docker on a v1 host, older Kubernetes nodes): microseconds per period,
# -1 for none; the period in cpu.cfs_period_us beside it.
CGROUP_V1_CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune_process` set."""

    switch_interval_s: float
    malloc_pinned: bool  # glibc accepted both thresholds (False off Linux/glibc)
    threads: int  # torch intra-op threads


def _quota_cores(cpu_max: Path, cfs_quota: Path) -> int | None:
    """The CPU quota in whole cores (rounded up), from cgroup v2, else v1; None without one."""
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        try:
            quota = cfs_quota.read_text().strip()
            period = (cfs_quota.parent / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX, cfs_quota: Path = CGROUP_V1_CFS_QUOTA) -> int:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _quota_cores(cpu_max, cfs_quota)
    return cores if quota is None else min(cores, quota)


def model_threads(requested: int, cpu_max: Path = CGROUP_CPU_MAX, cfs_quota: Path = CGROUP_V1_CFS_QUOTA,
                  workers: int = 1) -> int:
    """``--threads``, or for 0 each worker's share of the usable cores less one (its event loop's), at least 1."""
    return requested or max(1, usable_cores(cpu_max, cfs_quota) // workers - 1)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (the one with ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    if not (sys.platform.startswith("linux") and name):
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") else None


def pin_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds (turning its adaptive threshold off); whether glibc took both."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return mmap_ok and trim_ok


def tune_process(settings: Settings) -> Tuning:
    """Apply the switch interval, the malloc thresholds and the model's thread count (idempotent)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    pinned = pin_malloc_thresholds()
    threads = model_threads(settings.threads, workers=settings.workers)
    torch.set_num_threads(threads)
    return Tuning(sys.getswitchinterval(), pinned, threads)
