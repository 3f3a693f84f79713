"""SIGTERM under load (64 clients, 4 images a request): every request answered, exit 0, twice.

The ten-round version is ``python -m bench.sigterm`` (README, Reliability, has its result).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.sigterm import one_round

ROUNDS = 2


def test_sigterm_under_load_leaves_no_request_unanswered(tiny_checkpoint: Path) -> None:
    for _ in range(ROUNDS):
        result = asyncio.run(one_round(tiny_checkpoint, clients=64, images=4, grace_s=0.5, extra=[]))
        assert result.unanswered == [], result.unanswered
        assert result.exit_code == 0
        assert set(result.statuses) <= {200, 503} and result.statuses[200] >= 64, result.statuses
        assert result.statuses[503] + result.refused_connections == 64  # each client ended on a safe refusal
