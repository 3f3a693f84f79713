"""The async client against an app served in-process (the sync client runs against a real server in test_main)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from service_testing import from_png, random_pixels, to_png

from service.client import AsyncGlowClient, GlowAPIError


@pytest.fixture
async def glow(app: FastAPI) -> AsyncGlowClient:
    async with AsyncGlowClient("http://service.test", transport=httpx.ASGITransport(app=app)) as client:
        yield client


async def test_every_method(glow: AsyncGlowClient) -> None:
    assert await glow.healthy() and await glow.ready()
    info = await glow.model_info()
    assert info.image_shape == [1, 28, 28] and info.latent_dim == 784
    images = random_pixels(2, 0)
    pngs = [to_png(image) for image in images]
    scores = await glow.score(pngs)
    assert len(scores) == 2 and scores[0].log_likelihood != scores[1].log_likelihood
    encoded = await glow.encode(pngs)
    assert encoded.log_likelihood == [s.log_likelihood for s in scores]
    decoded = await glow.decode(encoded.latents)
    assert all(np.array_equal(from_png(png), image) for png, image in zip(decoded, images, strict=True))
    samples = await glow.sample(n=3, temperature=0.6, seed=5)
    assert (len(samples.images), samples.temperature, samples.seed) == (3, 0.6, 5)
    assert (await glow.sample(n=3, temperature=0.6, seed=5)).images == samples.images
    jpeg = to_png(images[0], format="JPEG")
    assert len(await glow.score([jpeg])) == 1


async def test_errors_raise_with_status_detail_and_request_id(glow: AsyncGlowClient) -> None:
    with pytest.raises(GlowAPIError) as error:
        await glow.sample(n=0)
    assert error.value.status_code == 422 and "query parameter 'n'" in error.value.detail
    assert error.value.request_id
    with pytest.raises(GlowAPIError, match="28x28") as wrong_size:
        await glow.score([to_png(random_pixels(1, 1, (1, 8, 8))[0])])
    assert wrong_size.value.status_code == 422
    assert len(await glow.score([to_png(random_pixels(1, 1, (1, 8, 8))[0])], resize=True)) == 1
