"""POST /log-likelihood?heatmap=true and heatmap_overlay, the web page at / and the offline /docs."""

from __future__ import annotations

import asyncio
import base64
import math
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from service_testing import files, from_png, random_pixels, to_png

from model.checkpoint import load_checkpoint, resolve_paths, write_json
from model.heatmap import SIDECAR_KEY, VERSION_1, HeatmapCalibration
from service.app import create_app
from service.client import AsyncGlowClient
from service.settings import Settings

SCORE_FIELDS = {"log_likelihood", "bits_per_dim", "anomaly_score", "percentile", "is_anomaly"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected_maps(checkpoint: Path, images: list[np.ndarray]) -> np.ndarray:
    """The maps model.heatmap gives the plain model's latents of ``images``."""
    reference = load_checkpoint(checkpoint)
    calibration = HeatmapCalibration.from_json(reference.meta[SIDECAR_KEY], reference.model.latent_shapes)
    with torch.no_grad():
        latents = reference.model.log_prob_and_levels(torch.from_numpy(np.stack(images)))[1]
    return calibration.maps(latents, (28, 28)).numpy()


async def test_without_the_option_nothing_changes(client: httpx.AsyncClient) -> None:
    response = await client.post("/log-likelihood", files=files([to_png(p) for p in random_pixels(2, seed=0)]))
    assert response.status_code == 200
    assert all(set(result) == SCORE_FIELDS for result in response.json()["results"])


@pytest.mark.parametrize("how", ["query", "json"])
async def test_heatmap_is_an_hxw_map_of_finite_floats_from_the_scoring_pass(
    client: httpx.AsyncClient, tiny_checkpoint: Path, how: str
) -> None:
    images = random_pixels(3, seed=1)
    plain = (await client.post("/log-likelihood", files=files([to_png(p) for p in images]))).json()["results"]
    if how == "query":
        response = await client.post("/log-likelihood?heatmap=true", files=files([to_png(p) for p in images]))
    else:
        response = await client.post("/log-likelihood", json={"images": [b64(to_png(p)) for p in images],
                                                               "heatmap": True})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = expected_maps(tiny_checkpoint, images)
    for result, before, want in zip(results, plain, expected):
        assert set(result) == SCORE_FIELDS | {"heatmap"}
        assert {k: result[k] for k in SCORE_FIELDS} == before  # the same numbers as without the option
        heat = np.asarray(result["heatmap"])
        assert heat.shape == (28, 28) and all(math.isfinite(v) for v in heat.ravel()) and (heat >= 0).all()
        assert np.allclose(heat, want, rtol=1e-3, atol=1e-3)


async def test_overlay_is_an_rgb_png_of_the_image_with_its_map(client: httpx.AsyncClient) -> None:
    image = np.zeros((1, 28, 28), dtype=np.uint8)
    response = await client.post("/log-likelihood?heatmap_overlay=true", files=files([to_png(image)]))
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert set(result) == SCORE_FIELDS | {"heatmap", "heatmap_overlay"}
    rgb = from_png(base64.b64decode(result["heatmap_overlay"]))
    assert rgb.shape == (3, 28, 28)
    hot = np.asarray(result["heatmap"]) > 0
    assert (rgb[0][~hot] == rgb[1][~hot]).all()  # grey where the map is 0
    assert (rgb[0][hot] >= rgb[1][hot]).all()  # reddened where it is not


async def test_only_the_images_that_asked_get_a_map(client: httpx.AsyncClient) -> None:
    asked, plain = await asyncio.gather(
        client.post("/log-likelihood?heatmap=true", files=files([to_png(random_pixels(1, seed=2)[0])])),
        client.post("/log-likelihood", files=files([to_png(random_pixels(1, seed=3)[0])])),
    )
    assert "heatmap" in asked.json()["results"][0]
    assert "heatmap" not in plain.json()["results"][0]


async def test_the_option_on_another_endpoint_or_of_the_wrong_type_is_422(client: httpx.AsyncClient) -> None:
    image = b64(to_png(random_pixels(1, seed=4)[0]))
    response = await client.post("/encode", json={"images": [image], "heatmap": True})
    assert response.status_code == 422 and "heatmap" in response.json()["detail"]
    response = await client.post("/log-likelihood?heatmap=maybe", json={"images": [image]})
    assert response.status_code == 422 and "heatmap" in response.json()["detail"]


def with_heatmap_entry(checkpoint: Path, folder: Path, entry: dict | None) -> Path:
    """A copy of ``checkpoint`` in ``folder`` whose sidecar's heatmap entry is ``entry`` (None: none)."""
    folder.mkdir()
    weights, sidecar = resolve_paths(checkpoint)
    (folder / weights.name).write_bytes(weights.read_bytes())
    meta = {key: value for key, value in load_checkpoint(checkpoint).meta.items() if key != SIDECAR_KEY}
    write_json(folder / sidecar.name, meta if entry is None else {**meta, SIDECAR_KEY: entry})
    return folder


async def test_a_checkpoint_without_heatmap_calibration_refuses_the_option_with_422(
    make_settings: Callable[..., Settings], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    app = create_app(make_settings(weights=with_heatmap_entry(tiny_checkpoint, tmp_path / "bare", None)))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://service.test"
    ) as http:
        image = files([to_png(random_pixels(1, seed=5)[0])])
        assert (await http.post("/log-likelihood", files=image)).status_code == 200
        response = await http.post("/log-likelihood?heatmap=true", files=image)
        assert response.status_code == 422 and "python -m model.heatmap" in response.json()["detail"]


async def test_a_version_1_calibration_written_before_is_served_as_version_1_maps(
    make_settings: Callable[..., Settings], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A sidecar entry without "version" or method parameters: the map of version 1 (model.heatmap.VERSION_1)."""
    reference = load_checkpoint(tiny_checkpoint)
    meta = reference.meta
    entry = {key: meta[SIDECAR_KEY][key] for key in ("energy_mean", "energy_std", "overlay_max")}
    old = with_heatmap_entry(tiny_checkpoint, tmp_path / "old", entry)
    images = random_pixels(2, seed=7)
    current = HeatmapCalibration.from_json(meta[SIDECAR_KEY], reference.model.latent_shapes)
    version_1 = HeatmapCalibration(current.mean, current.std, current.overlay_max, VERSION_1)
    with torch.no_grad():
        latents = reference.model.log_prob_and_levels(torch.from_numpy(np.stack(images)))[1]
    app = create_app(make_settings(weights=old))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://service.test"
    ) as http:
        response = await http.post("/log-likelihood?heatmap=true", files=files([to_png(p) for p in images]))
    assert response.status_code == 200, response.text
    served = np.asarray([result["heatmap"] for result in response.json()["results"]])
    assert np.allclose(served, version_1.maps(latents, (28, 28)).numpy(), rtol=1e-3, atol=1e-3)
    assert not np.allclose(served, current.maps(latents, (28, 28)).numpy(), rtol=1e-3, atol=1e-3)


async def test_the_client_asks_for_maps_and_overlays(app: FastAPI) -> None:
    async with AsyncGlowClient("http://service.test", transport=httpx.ASGITransport(app=app)) as glow:
        [plain] = await glow.score([to_png(random_pixels(1, seed=6)[0])])
        [mapped] = await glow.score([to_png(random_pixels(1, seed=6)[0])], heatmap_overlay=True)
    assert plain.heatmap is None and plain.heatmap_overlay is None
    assert mapped.heatmap is not None and len(mapped.heatmap) == 28 and len(mapped.heatmap[0]) == 28
    assert mapped.heatmap_overlay is not None and mapped.anomaly_score == plain.anomaly_score


async def test_the_page_and_its_files_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert (await client.get(asset)).status_code == 200
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links)  # all from the app


async def test_docs_load_swagger_ui_from_the_app_itself(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower()
    for asset in ("/static/swagger-ui/swagger-ui-bundle.js", "/static/swagger-ui/swagger-ui.css"):
        assert asset in docs.text
        response = await client.get(asset)
        assert response.status_code == 200 and len(response.content) > 100_000
