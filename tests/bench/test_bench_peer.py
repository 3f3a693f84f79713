"""The nflows peer is the same architecture as our Glow (skipped when nflows is not installed)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("nflows")

from bench.peer import NflowsGlow, count_steps  # noqa: E402
from model.glow import Glow, GlowConfig  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("levels, steps", [(2, 3), (3, 2)])
def test_peer_has_the_same_levels_steps_and_latents(levels: int, steps: int) -> None:
    config = GlowConfig(image_shape=(1, 32, 32) if levels == 3 else (1, 28, 28), levels=levels,
                        steps_per_level=steps, hidden_channels=8)
    peer = NflowsGlow(config)
    ours = Glow(config)
    counts = count_steps(peer)
    assert counts == {"squeeze": levels, "actnorm": levels * steps, "one_by_one": levels * steps,
                      "coupling": levels * steps}
    assert peer.steps_per_level == [steps] * levels
    assert peer.latent_dim == ours.latent_dim == config.dims
    # same coupling network widths as ours: the convs of one step hold the same number of weights
    ours_net = sum(p.numel() for p in ours.levels[0].steps[0].coupling.net.parameters())
    peer_coupling = next(m for m in peer.modules() if type(m).__name__ == "AffineCouplingTransform")
    peer_net = sum(p.numel() for p in peer_coupling.transform_net.parameters())
    assert peer_net == ours_net - ours.levels[0].steps[0].coupling.net[4].logs.numel()  # ours adds the zero-conv scale


def test_peer_scores_encodes_and_decodes_like_ours() -> None:
    warnings.filterwarnings("ignore", message=".*triangular_solve.*")
    config = GlowConfig(levels=2, steps_per_level=2, hidden_channels=8)
    x = torch.randint(0, 256, (6, *config.image_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    peer = NflowsGlow(config)
    peer.initialize(x)
    with torch.inference_mode():
        log_prob = peer.log_prob(x)
        z = peer.encode(x)
        assert log_prob.shape == (6,) and torch.isfinite(log_prob).all()
        assert z.shape == (6, config.dims)
        assert torch.equal(peer.decode(z), x)
        assert peer.sample(3).shape == (3, *config.image_shape)
