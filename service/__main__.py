"""``python -m service [flags]``: flags and GLOW_* variables -> settings -> checkpoint -> uvicorn.

Exit codes: 0 after a graceful shutdown (SIGTERM or SIGINT: admission stops, queued and
running work is answered), 1 when the checkpoint or device is unusable or the server
cannot start, 2 for a bad flag or variable. Errors before serving are one line on stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import torch
import uvicorn

from model.checkpoint import CheckpointError
from model.device import DeviceUnavailable
from service.app import create_app, runners_for
from service.settings import Settings, SettingsError
from service.state import ServiceState

PROG = "python -m service"


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app to stop admitting work the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.request_shutdown()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """A signal outside uvicorn's own handling (re-raised by uvicorn after its graceful shutdown): exit 0."""
    raise SystemExit(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD_BYTES = 32 * 2**20
SWITCH_INTERVAL_S = 0.0005


def tune_process() -> None:
    """Process settings measured to matter for serving (bench/README.md).

    - glibc adapts its mmap threshold at run time, so torch's per-batch buffers (a few MB
      at batch 64) were either reused from the heap or mapped and unmapped on every batch,
      depending on allocation history: batch-64 scoring took 1.4-3x longer in some starts.
      Pinning the thresholds (what MALLOC_MMAP_THRESHOLD_ would do) makes it the fast case.
    - The model thread takes the GIL back after every tensor op; with the default 5 ms
      switch interval an event loop busy with HTTP parsing starved it 4-8x.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 CPU quota: "<quota> <period>" or "max <period>"


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity stands
    return cores


def model_threads(requested: int, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """``--threads``, or for 0 the usable cores less one (the event loop's), at least 1."""
    return requested or max(1, usable_cores(cpu_max) - 1)


def main(argv: Sequence[str] | None = None) -> int:
    tune_process()
    try:
        settings = Settings.from_args(argv)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(model_threads(settings.threads))
    try:
        runners = runners_for(settings)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    for name, runner in runners.items():
        try:
            runner.load()
        except (CheckpointError, DeviceUnavailable) as exc:
            which = f"model {name!r}: " if len(runners) > 1 else ""
            print(f"{PROG}: {which}{exc}", file=sys.stderr)
            return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn restores these handlers after its own graceful shutdown and re-raises the
    # signal it caught: with the default handlers a clean SIGTERM would end as "killed".
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    app = create_app(settings, runners)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # service.access logs one structured line per request
        lifespan="on",
    )
    server = GracefulServer(config, app.state.service)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
