"""Reliability: hostile inputs, overload, disconnecting clients, faults at start, SIGTERM under load.

Bounded in time and loopback only: tiny checkpoints, small queues, polls with deadlines.
What tests/service already covers (test_routes, test_app, test_main, test_imaging) is not
repeated: these are the inputs and situations it leaves out.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from service_testing import ServerProcess, b64, chunk, files, png_declaring, from_png, random_pixels, to_png, wait_until

from model.checkpoint import Checkpoint
from model.data import sha256_file
from service.__main__ import main

OPERATIONS = ("log_likelihood", "encode", "decode", "sample")
ANSWER_S = 10  # a refusal of a hostile input must come at once, not after decoding it


def padded_png(extra_bytes: int) -> bytes:
    """A valid 28x28 PNG carrying ``extra_bytes`` in a private ancillary chunk (decoders skip it)."""
    png = to_png(random_pixels(1, 0)[0])
    after_ihdr = 8 + 25
    return png[:after_ihdr] + chunk(b"prVt", bytes(extra_bytes)) + png[after_ihdr:]


def json_body(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def latent_with(value: str) -> dict[str, Any]:
    return json_body('{"latents": [[' + ", ".join([value] + ["0.0"] * 783) + "]]}")


def batches_run(app: FastAPI) -> dict[str, float]:
    registry, model = app.state.service.metrics.registry, app.state.service.default.name
    return {op: registry.get_sample_value("glow_batch_size_count", {"model": model, "operation": op}) or 0.0
            for op in OPERATIONS}


PNG = to_png(random_pixels(1, 0)[0])
TRUNCATED = PNG[: len(PNG) // 2]

# (path, request, status, message): each against the defaults (64 images, n <= 64, 16 MiB bodies)
BAD_INPUTS: dict[str, tuple[str, Callable[[], dict[str, Any]], int, str]] = {
    "truncated-png-multipart": ("/log-likelihood", lambda: {"files": files([TRUNCATED])}, 400,
                                "images[0]: corrupt PNG or JPEG image"),
    "truncated-png-json": ("/encode", lambda: {"json": {"images": [b64(PNG), b64(TRUNCATED)]}}, 400,
                           "images[1]: corrupt PNG or JPEG image"),
    "bomb-100000x100000": ("/log-likelihood", lambda: {"files": files([png_declaring(100_000, 100_000)])}, 413,
                           "images[0]: image refused as a decompression bomb"),
    "bomb-100000x100000-resize": ("/encode", lambda: {"json": {"images": [b64(png_declaring(100_000, 100_000))],
                                                               "resize": True}}, 413, "decompression bomb"),
    "bomb-past-pillow-limit": ("/log-likelihood", lambda: {"files": files([png_declaring(12_000, 12_000)])}, 413,
                               "12000x12000 pixels exceeds the decompression-bomb limit"),
    "10mb-garbage-multipart": ("/log-likelihood", lambda: {"files": files([b"\x89PNG" + bytes(10 * 2**20)])}, 413,
                               "request body exceeds the limit of"),
    "10mb-garbage-json": ("/encode", lambda: {"json": {"images": [b64(bytes(7 * 2**20))]}}, 413,
                          "request body exceeds the limit of"),
    "garbage-past-the-image-cap": ("/encode", lambda: {"json": {"images": [b64(bytes(100_000))]}}, 413,
                                   "bytes; at most 65536 bytes per image are accepted"),
    "10000-images-multipart": ("/log-likelihood", lambda: {"files": files([PNG] * 10_000)}, 413,
                               "request body exceeds the limit of"),
    "10000-images-json": ("/encode", lambda: {"json": {"images": [b64(PNG)] * 10_000}}, 413,
                          "request body exceeds the limit of"),
    "65-images-multipart": ("/log-likelihood", lambda: {"files": files([PNG] * 65)}, 413,
                            "more than 64 file parts in one request; at most 64 images are accepted"),
    "65-images-json": ("/encode", lambda: {"json": {"images": [b64(PNG)] * 65}}, 413,
                       "65 images in one request; at most 64 are accepted"),
    "10000-latents": ("/decode", lambda: {"json": {"latents": [[0.0]] * 10_000}}, 413,
                      "10000 latents in one request; at most 64 are accepted"),
    "latent-past-float32": ("/decode", lambda: latent_with("1e39"), 422,
                            "latents[0] holds values beyond +-3.403e+38 (float32's range)"),
    "latent-nan": ("/decode", lambda: latent_with("NaN"), 422, "latents[0] holds NaN or infinite values"),
    "latent-empty": ("/decode", lambda: {"json": {"latents": [[]]}}, 422,
                     "latents[0] has 0 values; this model's latents have 784"),
    "latent-too-long": ("/decode", lambda: {"json": {"latents": [[0.0] * 785]}}, 422,
                        "latents[0] has 785 values; this model's latents have 784"),
    "latent-nested": ("/decode", lambda: {"json": {"latents": [[[0.0]]]}}, 422,
                      "latents[0][0]: Input should be a valid number"),
    "form-urlencoded": ("/log-likelihood", lambda: {"data": {"images": b64(PNG)}}, 415,
                        "unsupported content type 'application/x-www-form-urlencoded': send multipart/form-data"),
    "raw-png": ("/encode", lambda: {"content": PNG, "headers": {"content-type": "image/png"}}, 415,
                "unsupported content type 'image/png'"),
    "json-lookalike": ("/log-likelihood", lambda: {"content": b"{}", "headers": {"content-type": "application/jsonx"}},
                       415, "unsupported content type 'application/jsonx'"),
    "decode-text-plain": ("/decode", lambda: {"content": b"[]", "headers": {"content-type": "text/plain"}}, 415,
                          "send application/json"),
    "base64-data-uri": ("/log-likelihood", lambda: {"json": {"images": ["data:image/png;base64," + b64(PNG)]}}, 400,
                        "images[0]: not valid base64"),
    "base64-urlsafe": ("/log-likelihood", lambda: {"json": {"images": [base64.urlsafe_b64encode(b"\xfb\xff" * 9)
                                                                      .decode()]}}, 400, "not valid base64"),
    "base64-no-padding": ("/encode", lambda: {"json": {"images": [b64(PNG), b64(PNG).rstrip("=")]}}, 400,
                          "images[1]: not valid base64"),
    "base64-non-ascii": ("/log-likelihood", lambda: {"json": {"images": ["iVBORw0KGgoé="]}}, 400,
                         "images[0]: not valid base64"),
    "base64-not-a-string": ("/log-likelihood", lambda: {"json": {"images": [12345]}}, 422,
                            "images[0]: Input should be a valid string"),
}  # fmt: skip


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", list(BAD_INPUTS))
async def test_a_hostile_input_gets_its_contract_status_at_once_and_never_reaches_the_model(
    app: FastAPI, client: httpx.AsyncClient, name: str
) -> None:
    path, make_request, status, message = BAD_INPUTS[name]
    started = time.perf_counter()
    response = await client.post(path, **make_request())
    elapsed = time.perf_counter() - started
    assert response.status_code == status, response.text
    assert message in response.json()["detail"], response.text
    assert elapsed < ANSWER_S, f"{name} took {elapsed:.1f} s"
    assert batches_run(app) == dict.fromkeys(OPERATIONS, 0.0)  # validated before anything was queued
    assert (await client.get("/readyz")).status_code == 200


async def test_a_png_padded_to_the_image_cap_is_scored(client: httpx.AsyncClient) -> None:
    big = padded_png(60 * 2**10)  # the cap of one image is 64 KiB for 28x28 images
    response = await client.post("/log-likelihood", files=files([big]))
    assert response.status_code == 200, response.text
    alone = await client.post("/log-likelihood", files=files([PNG]))  # the same pixels without the padding
    assert response.json()["results"] == alone.json()["results"]


@pytest.mark.parametrize("n", ["1000000", str(10**30), "1e6"])
async def test_sample_n_of_a_million_is_422(client: httpx.AsyncClient, n: str) -> None:
    response = await client.get("/sample", params={"n": n})
    assert response.status_code == 422 and "query parameter 'n'" in response.json()["detail"], response.text


async def test_a_huge_finite_temperature_is_a_clear_422_not_images_of_nothing(client: httpx.AsyncClient) -> None:
    response = await client.get("/sample", params={"n": 2, "temperature": "1e300", "seed": 0})
    assert response.status_code == 422, response.text
    assert "samples [0, 1] of seed 0 at temperature 1e+300: the inverse flow overflows" in response.json()["detail"]
    assert (await client.get("/sample", params={"n": 2, "seed": 0})).status_code == 200  # and nothing else changed


# ----------------------------------------------------------------------------- real servers
@pytest.fixture
def start_server(tiny_checkpoint: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``python -m service`` on the tiny checkpoint with extra flags; every one is killed at the end."""
    started: list[ServerProcess] = []

    def start(*flags: str, weights: Path | None = None, listen: bool = True) -> ServerProcess:
        server = ServerProcess(["--weights", str(weights or tiny_checkpoint), "--device", "cpu", *flags])
        started.append(server)
        if listen:  # listening, or failed fast when it exited first
            wait_until(lambda: server.listening.is_set() or server.process.poll() is not None, timeout_s=60)
            assert server.listening.is_set(), f"the server did not start:\n{server.output()}"
        return server

    yield start
    for server in started:
        server.kill()


def metric_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def scrape(http: httpx.AsyncClient) -> str:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return response.text


async def depths(http: httpx.AsyncClient) -> dict[str, float]:
    return {dict(k)["operation"]: v for k, v in metric_values(await scrape(http), "glow_queue_depth").items()}


async def until(condition: Callable[[], Any], what: str, timeout_s: float = 30.0) -> None:
    """Await ``condition()`` (a coroutine) until it is true, polling, or fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"not reached in {timeout_s:g} s: {what}"
        await asyncio.sleep(0.02)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def requests_by_operation(images: list[np.ndarray], latents: list[list[float]], n: int) -> dict[str, httpx.Request]:
    """One request per operation, ``n`` images (or latents) each."""
    pngs = [to_png(image) for image in images[:n]]
    return {
        "log_likelihood": httpx.Request("POST", "/log-likelihood", json={"images": [b64(png) for png in pngs]}),
        "encode": httpx.Request("POST", "/encode", files=files(pngs)),
        "decode": httpx.Request("POST", "/decode", json={"latents": latents[:n]}),
        "sample": httpx.Request("GET", "/sample", params={"n": n, "temperature": 0.7}),
    }


def copy_request(http: httpx.AsyncClient, request: httpx.Request) -> httpx.Request:
    request.read()
    return http.build_request(request.method, request.url, content=request.content, headers=request.headers)


REQUEST_TIMEOUT_S = 5.0
OVERLOAD_FLAGS = (
    "--max-batch-size", "2", "--max-wait-ms", "20", "--max-queue-size", "4", "--max-images-per-request", "4",
    "--max-sample-n", "4", "--request-timeout-s", str(REQUEST_TIMEOUT_S),
)  # fmt: skip
BURST = 48  # concurrent requests of 4 images each, at a queue of 4 images per operation
BURSTS = 3
RSS_MARGIN = 32 * 2**20  # allocator slack (about 5 MiB here); a leak of 230 kB per request would exceed it


async def test_a_burst_past_capacity_gets_only_200s_and_503s_and_the_server_recovers(
    start_server: Callable[..., ServerProcess], reference: Checkpoint
) -> None:
    server = start_server(*OVERLOAD_FLAGS)
    images = random_pixels(4, 1)
    latents = reference.model.encode(torch.from_numpy(np.stack(images))).tolist()
    limits = httpx.Limits(max_connections=BURST + 4, max_keepalive_connections=BURST + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S + 25, limits=limits) as http:
        templates = requests_by_operation(images, latents, 4)
        for request in templates.values():  # warm every path once before measuring memory
            assert (await http.send(copy_request(http, request))).status_code == 200
        before = rss_bytes(server.process.pid)

        async def timed(request: httpx.Request) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = await http.send(request)
            return response, time.perf_counter() - started

        outcomes: list[tuple[httpx.Response, float]] = []
        for _ in range(BURSTS):
            burst = [copy_request(http, templates[OPERATIONS[i % 4]]) for i in range(BURST)]
            outcomes += await asyncio.gather(*(timed(request) for request in burst))
        after = rss_bytes(server.process.pid)

        statuses = [response.status_code for response, _ in outcomes]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses.count(200) > 0 and statuses.count(503) > 0, "the burst did not go past capacity"
        for response, _ in outcomes:
            if response.status_code == 503:
                assert "queue full" in response.json()["detail"] and int(response.headers["retry-after"]) >= 1
        slowest = max(seconds for _, seconds in outcomes)
        assert slowest < REQUEST_TIMEOUT_S + 5, f"a request took {slowest:.1f} s, past the configured deadline"
        assert after - before < RSS_MARGIN, f"RSS grew by {(after - before) / 2**20:.0f} MiB over the bursts"

        # right after: ready, empty queues, and every operation answers normally
        assert (await http.get("/readyz")).status_code == 200
        await until(lambda: _all_zero(http), "every queue empty after the bursts")
        for operation, request in templates.items():
            response = await http.send(copy_request(http, request))
            assert response.status_code == 200, (operation, response.text)
        scores = (await http.post("/log-likelihood", files=files([to_png(images[0])]))).json()["results"]
        expected = reference.model.log_prob(torch.from_numpy(images[0])[None]).item()
        assert scores[0]["log_likelihood"] == pytest.approx(expected, rel=1e-4)
        counted = metric_values(await scrape(http), "glow_requests_total")
        assert not [labels for labels in counted if dict(labels)["status"] not in ("200", "503")], counted


async def _all_zero(http: httpx.AsyncClient) -> bool:
    return set((await depths(http)).values()) == {0.0}


def raw_bytes(url: str, request: httpx.Request) -> bytes:
    """``request`` as HTTP/1.1 bytes for a raw socket."""
    request.read()
    target = httpx.URL(url).join(request.url)
    head = f"{request.method} {target.raw_path.decode()} HTTP/1.1\r\nhost: test\r\n"
    head += "".join(f"{key}: {value}\r\n" for key, value in request.headers.items() if key.lower() != "host")
    return (head + "\r\n").encode() + request.content


async def test_clients_that_hang_up_leave_no_work_and_do_not_poison_the_queue(
    start_server: Callable[..., ServerProcess], reference: Checkpoint
) -> None:
    """Batches of 8 that wait a minute to fill: 4-image requests stay queued until their clients hang up.

    Three rounds of 4 images per operation into queues of 8: a queue that kept counting
    abandoned images would refuse the third round. Then bodies cut off mid-upload. Then
    8 images per operation fill one batch each: the only batches that ever ran.
    """
    server = start_server(
        "--max-batch-size", "8", "--max-wait-ms", "60000", "--max-queue-size", "8", "--max-images-per-request", "8",
        "--max-sample-n", "8", "--request-timeout-s", "120",
    )  # fmt: skip
    images = random_pixels(8, 2)
    latents = reference.model.encode(torch.from_numpy(np.stack(images))).tolist()
    port = server.port
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        for _ in range(3):
            sockets = []
            for request in requests_by_operation(images, latents, 4).values():
                raw = socket.create_connection(("127.0.0.1", port))
                raw.sendall(raw_bytes(server.url, request))
                sockets.append(raw)
            try:
                await until(lambda: _depths_are(http, 4.0), "4 images queued per operation (a full queue refuses them)")
            finally:
                for raw in sockets:
                    raw.close()
            await until(lambda: _all_zero(http), "the hung-up requests' images dropped from every queue")

        cut_off = requests_by_operation(images, latents, 8)
        for operation in ("log_likelihood", "encode", "decode"):
            data = raw_bytes(server.url, cut_off[operation])
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(data[: len(data) - len(cut_off[operation].content) // 2])  # half the body

        expected_499 = {"/log-likelihood": 4.0, "/encode": 4.0, "/decode": 4.0, "/sample": 3.0}

        async def all_counted() -> bool:
            counted = metric_values(await scrape(http), "glow_requests_total")
            labelled = [(dict(labels), value) for labels, value in counted.items()]
            found = {labels["endpoint"]: value for labels, value in labelled if labels["status"] == "499"}
            return found == expected_499

        await until(all_counted, f"499s counted per endpoint: {expected_499}")
        responses = await asyncio.gather(*(http.send(copy_request(http, r)) for r in cut_off.values()))
        assert [response.status_code for response in responses] == [200] * 4, [r.text for r in responses]
        assert len(responses[0].json()["results"]) == 8 and len(responses[3].json()["images"]) == 8
        text = await scrape(http)
        for operation in OPERATIONS:  # one full batch each: nothing of the abandoned requests ever ran
            for name, value in (("glow_batch_size_count", 1.0), ("glow_batch_size_sum", 8.0)):
                assert [v for k, v in metric_values(text, name).items() if dict(k)["operation"] == operation] == [value]
    assert "Traceback" not in server.output()


async def _depths_are(http: httpx.AsyncClient, value: float) -> bool:
    return await depths(http) == dict.fromkeys(OPERATIONS, value)


# ---------------------------------------------------------------------------- faults at start
def damaged_copy(source: Path, target: Path, damage: str) -> Path:
    shutil.copytree(source, target)
    weights = target / "glow.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "tampered":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        raise ValueError(damage)
    return target


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_damaged_weights_end_the_process_with_one_line(
    start_server: Callable[..., ServerProcess], tiny_checkpoint: Path, tmp_path: Path, damage: str
) -> None:
    weights = damaged_copy(tiny_checkpoint, tmp_path / damage, damage)
    server = start_server(weights=weights, listen=False)
    assert server.finish() == 1
    assert len(server.lines) == 1, server.output()
    line = server.lines[0]
    assert line.startswith("python -m service: ") and str(weights / "glow.safetensors") in line
    assert "does not match the sidecar's" in line and "modified or corrupted" in line
    assert not server.listening.is_set()


@pytest.mark.parametrize("keep", [0, 7, 100, "half"], ids=["empty", "7-bytes", "in-header", "half"])
def test_truncated_weights_with_a_matching_sidecar_exit_1_with_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: int | str
) -> None:
    """Truncated, and the sidecar's sha256 rewritten to match: the file itself must still be refused."""
    copy = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "glow.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if keep == "half" else int(keep)])
    sidecar = copy / "glow.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "weights_sha256": sha256_file(weights)}))
    assert main(["--weights", str(copy), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m service: {weights}: corrupt safetensors file"), err


# ---------------------------------------------------------------------------- SIGTERM under load
PER_OPERATION = 12


async def test_sigterm_under_load_answers_every_admitted_request_then_exits_0(
    start_server: Callable[..., ServerProcess], reference: Checkpoint, reference_scorer: Any
) -> None:
    """48 one-image requests queued (batches of 16 that wait a minute): SIGTERM drains them all, correctly."""
    server = start_server(
        "--max-batch-size", "16", "--max-wait-ms", "60000", "--max-queue-size", "64",
        "--max-images-per-request", "16", "--max-sample-n", "16", "--request-timeout-s", "120",
    )  # fmt: skip
    images = random_pixels(PER_OPERATION, 3)
    pixels = torch.from_numpy(np.stack(images))
    latents = reference.model.encode(pixels).tolist()
    expected_ll = reference_scorer.score(pixels).log_likelihood.tolist()
    limits = httpx.Limits(max_connections=4 * PER_OPERATION + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        pending = [
            *(http.post("/log-likelihood", files=files([to_png(image)])) for image in images),
            *(http.post("/encode", json={"images": [b64(to_png(image))]}) for image in images),
            *(http.post("/decode", json={"latents": [latent]}) for latent in latents),
            *(http.get("/sample", params={"n": 1, "seed": seed}) for seed in range(PER_OPERATION)),
        ]
        tasks = [asyncio.ensure_future(request) for request in pending]
        try:
            queued = float(PER_OPERATION)
            await until(lambda: _depths_are(http, queued), f"{PER_OPERATION} requests queued per operation")
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        server.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        async with asyncio.timeout(45):  # well under the minute the batches would wait to fill
            responses = await asyncio.gather(*tasks)
        drained_s = time.monotonic() - started

    assert [response.status_code for response in responses] == [200] * len(responses), [
        (response.status_code, response.text[:100]) for response in responses if response.status_code != 200
    ]
    assert drained_s < 30
    scored = [response.json()["results"][0]["log_likelihood"] for response in responses[:PER_OPERATION]]
    assert scored == pytest.approx(expected_ll, rel=1e-5)
    encoded = np.array([response.json()["latents"][0] for response in responses[PER_OPERATION : 2 * PER_OPERATION]])
    assert np.allclose(encoded, np.array(latents), atol=1e-5)
    decoded = [
        from_png(base64.b64decode(r.json()["images"][0])) for r in responses[2 * PER_OPERATION : 3 * PER_OPERATION]
    ]
    assert all(np.array_equal(got, want) for got, want in zip(decoded, images, strict=True))
    sampled = [from_png(base64.b64decode(r.json()["images"][0])) for r in responses[3 * PER_OPERATION :]]
    for seed, got in enumerate(sampled):
        assert np.array_equal(got, reference.model.sample(1, 0.7, seed=seed).numpy()[0])

    wait_until(lambda: any("Shutting down" in line for line in server.lines), timeout_s=30)
    try:  # new work after the signal is refused, never run
        late = httpx.post(f"{server.url}/log-likelihood", files=files([PNG]), timeout=10)
    except httpx.TransportError:
        pass
    else:
        assert late.status_code == 503 and "shutting down" in late.json()["detail"], late.text
    assert server.finish(timeout_s=60) == 0
    assert "Traceback" not in server.output()
