"""``python -m service [flags]``: flags and GLOW_* variables -> settings -> checkpoint -> uvicorn.

Exit codes: 0 after a graceful shutdown, 1 when the checkpoint or device is unusable or
the server cannot start, 2 for a bad flag or variable. Errors before serving are one
line on stderr.

Shutdown (SIGTERM or SIGINT): readiness turns 503 at once and new work is refused with
503; for ``--shutdown-grace-s`` the listener still accepts, and every response carries
``Connection: close`` (load balancers notice, clients reconnect elsewhere). Then the
listener closes, connections with nothing received are closed, requests in progress
(and queued work) are answered, and the process exits 0. A second signal skips the
grace. With ``--workers N`` (N > 1) the process supervises N such servers on one socket
(``service.workers``).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import uvicorn

from model.checkpoint import CheckpointError
from model.device import DeviceUnavailable
from service.app import create_app, runners_for
from service.protocol import guarded_protocol
from service.settings import Settings, SettingsError
from service.state import ServiceState
from service.tuning import tune_process
from service.workers import WorkerLink, bound_socket, serve_workers

PROG = "python -m service"
log = logging.getLogger("service")


class GracefulServer(uvicorn.Server):
    """uvicorn's server: on a signal the app stops admitting work at once, the listener ``grace_s`` later."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, grace_s: float,
                 link: WorkerLink | None = None) -> None:
        super().__init__(config)
        self._state = state
        self._grace_s = grace_s
        self._grace: threading.Timer | None = None
        self._link = link

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._link is not None:
            self._link.ready.set()  # the supervisor's signal that this worker serves
        elif self.started and sockets:
            self._log_started_message(sockets)  # uvicorn logs "running on" only for sockets it bound itself

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.request_shutdown()
        if self._grace is None and self._grace_s > 0:
            log.info("shutting down: readiness 503, refusing new work; closing the listener in %g s", self._grace_s)
            self._grace = threading.Timer(self._grace_s, super().handle_exit, (sig, frame))
            self._grace.daemon = True
            self._grace.start()
            return
        if self._grace is not None:
            self._grace.cancel()  # a second signal: no more grace
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """A signal outside uvicorn's own handling (re-raised by uvicorn after its graceful shutdown): exit 0."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None, link: WorkerLink | None = None) -> int:
    """Serve until a signal; ``link``: as one of ``--workers`` processes, on the supervisor's socket."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_args(argv)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1 and link is None:
        return serve_workers(settings, argv, PROG)
    tune_process(settings)  # before the model loads; create_app applies it again (idempotent)
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
        loop="asyncio",  # not uvicorn's "auto": installing uvloop must not change the loop (no gain measured here)
        http=guarded_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
    )
    server = GracefulServer(config, app.state.service, settings.shutdown_grace_s, link)
    host, port = (link.host, link.port) if link is not None else (settings.host, settings.port)
    try:  # bound here, not by uvicorn: a bad host or a port in use is one line and exit 1, as the README says
        sockets = [bound_socket(host, port, listen=True, share=link is not None)]  # workers share the port
    except OSError as exc:
        print(f"{PROG}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    server.run(sockets=sockets)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
