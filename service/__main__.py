"""``python -m service [flags]``: flags and GLOW_* variables -> settings -> checkpoint -> uvicorn.

Exit codes: 0 after a graceful shutdown (SIGTERM or SIGINT: admission stops, queued and
running work is answered), 1 when the checkpoint or device is unusable or the server
cannot start, 2 for a bad flag or variable. Errors before serving are one line on stderr.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from model.checkpoint import CheckpointError
from model.device import DeviceUnavailable
from service.app import create_app, runners_for
from service.settings import Settings, SettingsError
from service.state import ServiceState
from service.tuning import tune_process

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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = Settings.from_args(argv)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
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
    )
    server = GracefulServer(config, app.state.service)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
