"""The whole model on a tiny 2-level Glow: exact likelihood, inverses, latents, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from model.glow import Glow, GlowConfig

TINY = GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=2, hidden_channels=8)


def tiny_glow(config: GlowConfig = TINY, dtype: torch.dtype = torch.float32, seed: int = 0) -> Glow:
    """A tiny Glow, ActNorm-initialised on random images, every parameter moved off its init."""
    torch.manual_seed(seed)
    model = Glow(config).to(dtype)
    model.initialize(images(32, config, seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval()


def images(n: int, config: GlowConfig = TINY, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *config.image_shape), generator=generator, dtype=torch.uint8)


def test_latent_layout_covers_every_dimension() -> None:
    model = Glow(GlowConfig(image_shape=(1, 28, 28), levels=2, steps_per_level=1, hidden_channels=4))
    assert model.latent_shapes == [(2, 14, 14), (8, 7, 7)]
    assert model.latent_dim == 784


def test_config_rejects_shapes_the_levels_cannot_squeeze() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        GlowConfig(image_shape=(1, 28, 28), levels=3)
    with pytest.raises(ValueError, match="n_bits"):
        GlowConfig(n_bits=9)
    assert GlowConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown config fields"):
        GlowConfig.from_dict({**TINY.to_dict(), "width": 3})


def test_log_prob_is_change_of_variables_with_brute_force_jacobian() -> None:
    model = tiny_glow(dtype=torch.float64)
    x = images(2)
    log_prob = model.log_prob(x)
    y = model.to_continuous(x)
    for row in range(2):
        def flow(v: torch.Tensor) -> torch.Tensor:
            latents, _ = model.flow_forward(v.reshape(1, *TINY.image_shape))
            return torch.cat([eps.flatten() for eps in latents])

        z = flow(y[row].flatten())
        _, logdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(flow, y[row].flatten(), vectorize=True))
        log_normal = -0.5 * (z.square().sum() + z.numel() * math.log(2 * math.pi))
        expected = log_normal + logdet - TINY.dims * 8 * math.log(2)
        torch.testing.assert_close(log_prob[row], expected, rtol=1e-10, atol=1e-8)


def test_flow_inverse_undoes_flow_forward_and_every_parameter_learns() -> None:
    model = tiny_glow(dtype=torch.float64).train()
    y = model.to_continuous(images(4), torch.rand(4, *TINY.image_shape, dtype=torch.float64))
    latents, logdet = model.flow_forward(y)
    back, inverse_logdet = model.flow_inverse(latents)
    torch.testing.assert_close(back, y, rtol=0, atol=1e-10)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-12, atol=1e-9)  # the whole inverse's log-det
    model.bits_per_dim(model(images(4), torch.rand(4, *TINY.image_shape, dtype=torch.float64))).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded"])
def test_each_level_inverse_returns_minus_its_forward_log_det(folded: bool) -> None:
    model = tiny_glow(dtype=torch.float64)
    model = model.fold() if folded else model
    x = model.to_continuous(images(3))
    for level in model.levels:
        x_next, eps, logdet = level(x)
        back, inverse_logdet = level.inverse(x_next, eps)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
        torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-12, atol=1e-9)
        x = x_next


def test_decode_of_encode_returns_the_same_pixels() -> None:
    model = tiny_glow()
    x = images(64)
    z = model.encode(x)
    assert z.shape == (64, model.latent_dim) and z.dtype == torch.float32
    assert torch.equal(model.decode(z), x)
    z_again, log_prob = model.encode_with_log_prob(x)
    assert torch.equal(z_again, z) and torch.equal(log_prob, model.log_prob(x))
    extremes = torch.tensor([0, 255], dtype=torch.uint8).repeat(32)[: TINY.dims].reshape(1, *TINY.image_shape)
    assert torch.equal(model.decode(model.encode(extremes)), extremes)


def test_fewer_bits_quantise_consistently() -> None:
    config = GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1, hidden_channels=4, n_bits=5)
    model = tiny_glow(config)
    x = images(8, config)
    decoded = model.decode(model.encode(x))
    assert torch.equal(decoded, x // 8 * 8)
    # -log P includes D * 5 * log 2 for the 2^5 bins
    assert torch.all(model.bits_per_dim(model.log_prob(x)) > 0)


def test_log_prob_of_an_image_does_not_depend_on_its_batch() -> None:
    model = tiny_glow()
    x = images(16)
    together = model.log_prob(x)
    alone = torch.cat([model.log_prob(x[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=0)
    assert not torch.allclose(together[0], together[1])


def test_log_prob_is_deterministic_and_dequantised_bound_is_lower_on_average() -> None:
    model = tiny_glow()
    x = images(8)
    assert torch.equal(model.log_prob(x), model.log_prob(x))
    noisy = model.log_prob(x, torch.rand(x.shape))
    assert noisy.shape == (8,) and torch.isfinite(noisy).all()
    with pytest.raises(TypeError, match="uint8"):
        model.log_prob(x.float())


def test_sampling_with_a_seed_is_reproducible_and_temperature_scales_latents() -> None:
    model = tiny_glow()
    first = model.sample(6, temperature=0.7, seed=3)
    assert first.shape == (6, *TINY.image_shape) and first.dtype == torch.uint8
    assert torch.equal(first, model.sample(6, temperature=0.7, seed=3))
    assert not torch.equal(first, model.sample(6, temperature=0.7, seed=4))
    generator = torch.Generator().manual_seed(3)
    expected = model.decode((0.7 * torch.randn(6, model.latent_dim, generator=generator, dtype=torch.float64)).float())
    assert torch.equal(first, expected)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.sample(2, temperature=bad)


def test_decode_rejects_latents_of_the_wrong_length() -> None:
    model = tiny_glow()
    with pytest.raises(ValueError, match=f"\\(B, {model.latent_dim}\\)"):
        model.decode(torch.zeros(2, model.latent_dim + 1))


def test_initialize_normalises_every_actnorm_input_once() -> None:
    torch.manual_seed(0)
    model = Glow(TINY)
    assert not model.is_initialized
    x = images(64)
    model.initialize(x)
    assert model.is_initialized
    first = next(model.actnorms())
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
    model.eval().log_prob(x)
    hook.remove()
    torch.testing.assert_close(seen[0].mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.05, rtol=0)
    torch.testing.assert_close(seen[0].std(dim=(0, 2, 3)), torch.ones(4), atol=0.05, rtol=0)


def test_level_log_determinants_add_up_to_the_flows() -> None:
    model = tiny_glow()
    x = images(6)
    with torch.no_grad():
        log_prob, latents, levels = model.log_prob_and_levels(x)
        _, logdet = model.flow_forward(model.to_continuous(x))
    assert len(levels) == TINY.levels and all(ld.shape == (6,) for ld in levels)
    torch.testing.assert_close(sum(levels), logdet)
    assert torch.equal(log_prob, model.log_prob(x))
    assert all(torch.equal(a, b) for a, b in zip(latents, model.log_prob_and_latents(x)[1]))
