"""Class-conditional checkpoints over HTTP (API.md, Extensions): labels on /model, label on /sample,
predicted_label and label_probabilities on /log-likelihood; unconditional checkpoints unchanged."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI

from model.checkpoint import load_checkpoint
from service.app import create_app
from service.settings import Settings

from tests.service.conftest import serving
from tests.service.service_testing import files, from_png, make_checkpoint, random_pixels, to_png, b64

LABELS = ("cat", "dog", "7")


def sampled(response: httpx.Response) -> np.ndarray:
    """The images of a JSON /sample response, (n, C, H, W) uint8."""
    return np.stack([from_png(base64.b64decode(image)) for image in response.json()["images"]])


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("conditional"), seed=3, labels=LABELS)


@pytest.fixture
async def conditional(conditional_checkpoint: Path) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(Settings(weights=conditional_checkpoint, device="cpu", max_batch_size=8,
                                       max_wait_ms=1.0))
    async with serving(app) as client:
        yield client


async def test_model_lists_the_labels(conditional: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    assert (await conditional.get("/model")).json()["labels"] == list(LABELS)
    assert "labels" not in (await client.get("/model")).json()  # the unconditional tiny checkpoint


async def test_scores_carry_the_class_posterior_of_the_model(conditional: httpx.AsyncClient,
                                                             conditional_checkpoint: Path) -> None:
    images = random_pixels(5, seed=11)
    response = await conditional.post("/log-likelihood", files=files([to_png(p) for p in images]))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    model = load_checkpoint(conditional_checkpoint).model
    x = torch.from_numpy(np.stack(images))
    with torch.no_grad():
        log_prob, latents, _ = model.log_prob_and_levels(x)
        expected = model.class_log_posterior(latents[-1]).exp().double()
    for result, want, ll in zip(results, expected, log_prob.tolist()):
        got = result["label_probabilities"]
        assert len(got) == len(LABELS) and math.isclose(sum(got), 1.0, rel_tol=1e-9)
        assert np.allclose(got, want.numpy(), atol=1e-4)
        assert result["predicted_label"] == LABELS[int(want.argmax())]
        assert math.isclose(result["log_likelihood"], ll, rel_tol=1e-4)  # the mixture, log p(x)


async def test_unconditional_scores_have_no_class_fields(client: httpx.AsyncClient) -> None:
    response = await client.post("/log-likelihood", json={"images": [b64(to_png(random_pixels(1, seed=2)[0]))]})
    assert response.status_code == 200
    assert not {"predicted_label", "label_probabilities"} & set(response.json()["results"][0])


@pytest.mark.parametrize("label", ["dog", "1"])
async def test_sample_of_a_class_by_name_or_number(conditional: httpx.AsyncClient, conditional_checkpoint: Path,
                                                   label: str) -> None:
    response = await conditional.get("/sample", params={"n": 3, "seed": 5, "temperature": 0.5, "label": label})
    assert response.status_code == 200, response.text
    images = sampled(response)
    model = load_checkpoint(conditional_checkpoint).model
    assert np.array_equal(images, model.sample(3, 0.5, seed=5, label=1).numpy())
    other = model.sample(3, 0.5, seed=5, label=0).numpy()
    assert not np.array_equal(images, other)  # the class changes the images


async def test_a_digit_name_wins_over_the_number(conditional: httpx.AsyncClient, conditional_checkpoint: Path) -> None:
    """``7`` is a class name here (class 2), not a number out of range."""
    response = await conditional.get("/sample", params={"n": 2, "seed": 1, "label": "7"})
    assert response.status_code == 200
    model = load_checkpoint(conditional_checkpoint).model
    images = sampled(response)
    assert np.array_equal(images, model.sample(2, 0.7, seed=1, label=2).numpy())


async def test_sample_without_label_is_the_mixture_and_reproducible(conditional: httpx.AsyncClient,
                                                                    conditional_checkpoint: Path) -> None:
    first = sampled(await conditional.get("/sample", params={"n": 4, "seed": 9}))
    again = sampled(await conditional.get("/sample", params={"n": 4, "seed": 9}))
    assert np.array_equal(first, again)
    model = load_checkpoint(conditional_checkpoint).model
    assert np.array_equal(first, model.sample(4, 0.7, seed=9).numpy())


@pytest.mark.parametrize("label", ["3", "horse", "-1", "", "1.0", "\u0661", "\uff11"])  # Arabic-Indic and fullwidth 1
async def test_unknown_labels_are_422_naming_the_classes(conditional: httpx.AsyncClient, label: str) -> None:
    response = await conditional.get("/sample", params={"n": 1, "label": label})
    assert response.status_code == 422
    assert "cat, dog, 7" in response.text


async def test_label_on_an_unconditional_checkpoint_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/sample", params={"n": 1, "label": "0"})
    assert response.status_code == 422
    assert "not class-conditional" in response.text
