"""Schemathesis against the app's own OpenAPI schema, in process with the lifespan run, on the tiny checkpoint.

Every operation of ``/openapi.json``, with schema-valid and schema-invalid inputs: no 5xx,
and every status code, content type, documented header and body as the schema says.
The tests drive ``APIOperation.as_strategy`` with hypothesis themselves (schemathesis's
``from_fixture`` lazy loader does not run under pytest 9), and show that the same checks
fail on an app that breaks the schema, so a pass means something.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, ServerError
from schemathesis.generation import GenerationMode
from schemathesis.openapi.checks import JsonSchemaError, UndefinedStatusCode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_testing import random_pixels, to_png

import service.app
import service.routes
from service.app import create_app
from service.settings import Settings

Schema = schemathesis.schemas.BaseSchema
OPERATIONS = [
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/model"),
    ("POST", "/log-likelihood"), ("GET", "/sample"), ("POST", "/encode"), ("POST", "/decode"), ("GET", "/models"),
    ("GET", "/models/{name}/model"), ("POST", "/models/{name}/log-likelihood"), ("GET", "/models/{name}/sample"),
    ("POST", "/models/{name}/encode"), ("POST", "/models/{name}/decode"),
]  # fmt: skip
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = 100  # per operation, valid and invalid inputs together (a few ms each)
REQUEST_TIMEOUT_S = 20  # one in-process call; a hang fails the test instead of stalling the suite


@pytest.fixture
def api_schema(make_settings: Callable[..., Settings]) -> Iterator[Schema]:
    """The schema of a started app (``from_asgi`` runs its lifespan; the teardown ends it)."""
    app = create_app(make_settings(max_sample_n=8, max_images_per_request=4, max_body_bytes=256 * 1024))
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()


def fuzz(
    schema: Schema,
    method: str,
    path: str,
    examples: int = EXAMPLES,
    shrink: bool = True,
    checks: list[Callable[..., Any]] = CHECKS,
) -> Counter[int]:
    """Valid and invalid generated requests to one operation, each response validated by ``checks``.

    Returns how many responses had each status code.
    """
    operation = schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    statuses: Counter[int] = Counter()

    @settings(max_examples=examples, deadline=None, phases=phases, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: schemathesis.Case) -> None:
        statuses[case.call_and_validate(checks=checks, timeout=REQUEST_TIMEOUT_S).status_code] += 1

    run()
    return statuses


def failures(exc: BaseException) -> list[BaseException]:
    """The individual check failures in what hypothesis re-raised."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in failures(inner)]
    return [exc]


def test_the_fuzzed_operations_are_all_of_the_schema(api_schema: Schema) -> None:
    found = {(result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_conforms_to_its_schema(api_schema: Schema, method: str, path: str) -> None:
    statuses = fuzz(api_schema, method, path)
    assert statuses and all(status < 500 for status in statuses)
    if method == "POST" or path == "/sample":
        assert any(400 <= status < 500 for status in statuses), statuses  # bad inputs were sent


def test_while_shutting_down_every_answer_is_documented(api_schema: Schema) -> None:
    """Readiness off and admission closed: 503 with Retry-After (documented) wherever work is refused."""
    api_schema.app.state.service.request_shutdown()  # thread-safe; the app runs on schemathesis's loop
    # a 503 is the right answer here, also to invalid input: the statuses are checked below instead
    checks = [check for check in CHECKS if check not in (not_a_server_error, negative_data_rejection)]
    for method, path in OPERATIONS:
        statuses = fuzz(api_schema, method, path, examples=10, checks=checks)
        if path in ("/healthz", "/metrics"):
            assert set(statuses) == {200}, (path, statuses)
        else:
            assert 503 in statuses and all(status in (400, 413, 415, 422, 503) for status in statuses), (path, statuses)


def test_a_503_without_a_valid_retry_after_would_be_caught(api_schema: Schema, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema requires Retry-After >= 1 on every 503; the header check sees a bad one."""
    monkeypatch.setattr(service.routes, "RETRY_AFTER_S", "0")
    api_schema.app.state.service.request_shutdown()
    with pytest.raises((Failure, BaseExceptionGroup)) as caught:
        fuzz(api_schema, "GET", "/readyz", examples=5, shrink=False, checks=[response_headers_conformance])
    assert any(isinstance(found, JsonSchemaError) for found in failures(caught.value)), failures(caught.value)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_successful_answers_conform_to_the_schema(api_schema: Schema) -> None:
    """Generated bodies are almost never real PNGs or 784-float latents: the 200s, explicitly."""
    pngs = [to_png(image) for image in random_pixels(2, 0)]
    images = {"images": [b64(png) for png in pngs]}
    encoded = api_schema["/encode"]["POST"].Case(body=images, media_type="application/json").call()
    assert encoded.status_code == 200, encoded.text
    cases = [
        (
            "/log-likelihood", "POST",
            {"body": {"images": pngs}, "media_type": "multipart/form-data",
             "multipart_content_types": {"images": "image/png"}},
        ),
        ("/log-likelihood", "POST", {"body": images, "media_type": "application/json", "query": {"resize": True}}),
        ("/encode", "POST", {"body": images, "media_type": "application/json"}),
        ("/decode", "POST", {"body": {"latents": encoded.json()["latents"]}, "media_type": "application/json"}),
        ("/sample", "GET", {"query": {"n": 8, "temperature": 0.5, "seed": 3, "format": "json"}}),
        ("/sample", "GET", {"query": {"n": 3, "format": "png"}}),
    ]  # fmt: skip
    for path, method, kwargs in cases:
        response = api_schema[path][method].Case(**kwargs).call_and_validate(checks=CHECKS)
        assert response.status_code == 200, (path, kwargs.get("media_type"), response.text)


# ------------------------------------------------------------ the checks can fail
def undocumented_status(*_: Any, **__: Any) -> None:
    raise HTTPException(409, "an undocumented status")


def crash(*_: Any, **__: Any) -> None:
    raise RuntimeError("an injected bug")


def off_schema_error(status: int, message: str, retry_after: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)  # no "detail"


@pytest.mark.parametrize(
    ("path", "target", "replacement", "failure"),
    [
        ("/decode", (service.routes, "refuse_value_bombs"), crash, ServerError),
        ("/decode", (service.routes, "refuse_value_bombs"), undocumented_status, UndefinedStatusCode),
        ("/log-likelihood", (service.app, "detail"), off_schema_error, JsonSchemaError),  # image errors use it
    ],
    ids=["5xx", "undocumented-status", "body-off-schema"],
)
def test_the_fuzzing_catches_a_broken_app(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    target: tuple[object, str],
    replacement: Callable[..., Any],
    failure: type[Failure],
) -> None:
    monkeypatch.setattr(*target, replacement)
    app = create_app(make_settings(max_images_per_request=4))
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        with pytest.raises((Failure, BaseExceptionGroup)) as caught:
            fuzz(schema, "POST", path, shrink=False)
    finally:
        asgi.shutdown_lifespans()
    assert any(isinstance(found, failure) for found in failures(caught.value)), failures(caught.value)
