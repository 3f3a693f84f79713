"""Supervision: a failing model or batching loop answers every waiting request with 503, and readiness follows."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from service_testing import files, random_pixels, to_png

from service.state import ModelState

PNGS = [to_png(image) for image in random_pixels(3, 5)]
RECOVERY_S = 10.0


async def until_ready(client: httpx.AsyncClient, status: int) -> None:
    async with asyncio.timeout(RECOVERY_S):
        while (await client.get("/readyz")).status_code != status:
            await asyncio.sleep(0.05)


async def test_a_failing_model_answers_503_turns_unready_and_recovers(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    state: ModelState = app.state.service.default
    working = state.runner.call

    async def broken(fn: Any, *args: Any) -> Any:
        raise RuntimeError("injected: the model thread failed")

    monkeypatch.setattr(state.runner, "call", broken)
    responses = await asyncio.gather(*(client.post("/log-likelihood", files=files([png])) for png in PNGS))
    for response in responses:
        assert response.status_code == 503, response.text
        assert "the model failed on this batch (RuntimeError)" in response.json()["detail"]
        assert int(response.headers["retry-after"]) >= 1
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and "being probed" in ready.json()["detail"]
    assert (await client.get("/healthz")).status_code == 200  # alive: only readiness turns off
    refused = await client.post("/encode", files=files(PNGS[:1]))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"

    monkeypatch.setattr(state.runner, "call", working)  # the model answers again: the probe notices
    await until_ready(client, 200)
    assert (await client.post("/log-likelihood", files=files(PNGS))).status_code == 200


async def test_a_failed_batching_loop_answers_its_requests_503_and_restarts(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    state: ModelState = app.state.service.default
    batcher = state.scores
    calls = 0
    take = batcher._take

    def fails_once() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: the batching loop failed")
        return take()

    monkeypatch.setattr(batcher, "_take", fails_once)
    monkeypatch.setattr(batcher, "restart_delay_s", 0.5)
    response = await client.post("/log-likelihood", files=files(PNGS))
    assert response.status_code == 503, response.text
    assert "batching loop failed" in response.json()["detail"] and int(response.headers["retry-after"]) >= 1
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and "log_likelihood failed and is restarting" in ready.json()["detail"]
    await until_ready(client, 200)
    again = await client.post("/log-likelihood", files=files(PNGS))
    assert again.status_code == 200 and len(again.json()["results"]) == 3
