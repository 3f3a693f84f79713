"""Fixtures of the service tests: a tiny checkpoint, settings, apps served in-process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service_testing import make_checkpoint

from model.anomaly import AnomalyScorer
from model.checkpoint import Checkpoint, load_checkpoint
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path) -> Checkpoint:
    """The tiny checkpoint loaded directly, to compare the service's answers with."""
    return load_checkpoint(tiny_checkpoint, "cpu")


@pytest.fixture(scope="session")
def reference_scorer(reference: Checkpoint) -> AnomalyScorer:
    return AnomalyScorer(reference.model, reference.calibration, fpr=0.01)


@pytest.fixture(autouse=True)
def _no_glow_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read GLOW_* variables: the caller's environment must not change the tests."""
    for name in list(os.environ):
        if name.startswith("GLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(tiny_checkpoint: Path) -> Callable[..., Settings]:
    """Settings for the tiny checkpoint on the CPU, small batches; keyword overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"weights": tiny_checkpoint, "device": "cpu", "max_batch_size": 8, "max_wait_ms": 1.0}
        return Settings(**{**values, **overrides})

    return make


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield an in-process client of it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service.test") as client:
            yield client


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[FastAPI]:
    """A started app on the tiny checkpoint (default settings of ``make_settings``)."""
    application = create_app(make_settings())
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as http:
        yield http
