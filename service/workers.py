"""``python -m service --workers N``: N server processes answering on one listening socket.

The parent reserves the port and supervises; each worker is a fresh interpreter running the
single-process server (``service.__main__``) with its own event loop, its own copy of every
model and its own batchers, so N workers hold N GILs (one process holds one: its event loop,
decoding threads and model thread take turns). Each worker listens on a socket of its own
bound to the same port with ``SO_REUSEPORT``: the kernel spreads new connections over the
listening workers by a hash of their addresses. (One shared socket would let whichever
worker's event loop woke first accept a whole burst of connections: asyncio accepts up to
its backlog at once, so 64 connections opened together can all land on one worker.) A
worker still loading, or dead, has no socket and gets no connection. Measured against one
process in bench/README.md ("Several processes").

- **Start**: worker 0 starts first; should it fail (a bad checkpoint, no device) the parent
  exits with its code and its one line of error, before any other starts. Then the rest.
- **Metrics**: ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless already set)
  makes every worker's ``/metrics`` the sum over all of them (``service.metrics``).
- **Readiness**: each worker's ``/readyz`` answers for the worker that took the connection,
  which is the one that would serve the request.
- **Crashes**: a worker that dies after it was ready is started again (its figures stay in
  the shared counters); one that dies before it is ready stops the service.
- **Shutdown**: SIGTERM or SIGINT to the parent is passed to every worker (each drains as
  a single process does: readiness 503, grace, then its queued work answered); the parent
  exits 0 once all exited 0. Workers run in their own process group, so a terminal's Ctrl-C
  reaches them once, through the parent, and die with it should it be killed (Linux).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from service.metrics import MULTIPROCESS_DIR
from service.settings import Settings

log = logging.getLogger("service.workers")
PR_SET_PDEATHSIG = 1  # prctl(2)
RESTART_DELAY_S = 1.0  # before a crashed worker is started again
START_TIMEOUT_S = 600.0  # for a worker to load its checkpoints and warm up


@dataclass(frozen=True)
class WorkerLink:
    """What a worker gets from the parent: the address to listen on, and the event it sets once serving."""

    host: str
    port: int
    ready: Event


@dataclass
class Worker:
    index: int
    process: Any = None  # multiprocessing's SpawnProcess, once started
    ready: Event | None = None  # set by the worker once it serves (a new one per process)
    served: bool = False  # its current process was ready once
    done: bool = False  # exited for good (the service is stopping)
    exits: list[int] = field(default_factory=list)


def bound_socket(host: str, port: int, listen: bool, share: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port), with SO_REUSEPORT when ``share`` (the workers'), listening when ``listen``
    (the parent's, which only holds the port, does not, so it takes no connection); OSError when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and accepted ones inherit
    # it (with proto 0, every response written in two parts waited ~40 ms for the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (best effort elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_worker(argv: list[str], link: WorkerLink) -> None:
    """A worker process's entry: the single-process server on the parent's socket."""
    os.setpgid(0, 0)
    _die_with_parent()
    from service.__main__ import main  # noqa: PLC0415 (imported in the worker, after the metrics folder is set)

    sys.exit(main(argv, link))


class Supervisor:
    """The parent of the workers (module docstring)."""

    def __init__(self, settings: Settings, argv: list[str], port: int) -> None:
        self._argv = argv
        self._address = (settings.host, port)
        self._context = multiprocessing.get_context("spawn")
        self._workers = [Worker(i) for i in range(settings.workers)]
        self._stopping = False

    def _start(self, worker: Worker) -> None:
        worker.ready = self._context.Event()
        worker.process = self._context.Process(
            target=run_worker, args=(self._argv, WorkerLink(*self._address, worker.ready)),
            name=f"glow-worker-{worker.index}", daemon=False)
        worker.process.start()

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        for worker in self._workers:
            if worker.process is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signum)

    def _wait_ready(self, worker: Worker) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not worker.ready.is_set():
            if not worker.process.is_alive() or time.monotonic() > deadline or self._stopping:
                return worker.ready.is_set()
            worker.ready.wait(0.1)
        worker.served = True
        return True

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signal)
        first = self._workers[0]
        self._start(first)
        if not self._wait_ready(first):
            return self._stop_all(first)
        for worker in self._workers[1:]:
            self._start(worker)
        log.info("%d workers serving", len(self._workers))
        return self._supervise()

    def _stop_all(self, failed: Worker) -> int:
        """A worker could not start: stop the others and exit with its code (1 if it was killed or hung)."""
        self._signal(signal.SIGTERM, None)
        for worker in self._workers:
            if worker.process is not None:
                worker.process.join()
        code = failed.process.exitcode
        return code if code and code > 0 else 1

    def _supervise(self) -> int:
        """Until every worker has exited for good: start again any that dies after serving (not while stopping)."""
        while True:
            running = [w for w in self._workers if not w.done]
            if not running:
                return 0 if all(w.exits[-1] == 0 for w in self._workers) else 1
            wait([w.process.sentinel for w in running], timeout=0.5)
            for worker in running:
                if not worker.served and worker.ready.is_set():
                    worker.served = True
                code = worker.process.exitcode
                if code is None:
                    continue
                worker.exits.append(code)
                mark_process_dead(worker.process.pid)
                if not self._stopping and not worker.served:
                    log.error("worker %d exited with %s while starting: stopping", worker.index, code)
                    return self._stop_all(worker)
                if not self._stopping:
                    log.error("worker %d exited with %s; starting it again", worker.index, code)
                    time.sleep(RESTART_DELAY_S)
                if self._stopping:  # a signal may have come during the delay
                    worker.done = True
                    continue
                worker.served = False
                self._start(worker)


def serve_workers(settings: Settings, argv: list[str], prog: str) -> int:
    """Run ``settings.workers`` workers on one socket until a signal; the exit code of ``python -m service``."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print(f"{prog}: --workers needs SO_REUSEPORT (Linux, BSD, macOS)", file=sys.stderr)
        return 1
    try:
        sock = bound_socket(settings.host, settings.port, listen=False)
    except OSError as exc:
        print(f"{prog}: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own_dir = None
    if not os.environ.get(MULTIPROCESS_DIR):
        try:
            own_dir = tempfile.mkdtemp(prefix="glow-metrics-")
        except OSError as exc:
            sock.close()
            print(f"{prog}: no folder for the workers' metrics ({MULTIPROCESS_DIR} or a temporary one): {exc}",
                  file=sys.stderr)
            return 1
        os.environ[MULTIPROCESS_DIR] = own_dir
    try:
        return Supervisor(settings, argv, sock.getsockname()[1]).run()
    finally:
        sock.close()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
