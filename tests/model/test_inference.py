"""The folded inference form (eager and TorchScript) against the model it folds: same likelihoods, latents, images."""

from __future__ import annotations

import pytest
import torch
from test_glow import TINY, images, tiny_glow

from model.glow import GlowConfig
from model.inference import TracedGlow

CONFIGS = {
    "grey": TINY,
    "rgb, 3 levels": GlowConfig(image_shape=(3, 8, 8), levels=3, steps_per_level=2, hidden_channels=8),
    "5 bits": GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=3, hidden_channels=8, n_bits=5),
}
TOLERANCE = 1e-4  # relative, on log-likelihoods: the bound for any optimisation
FORMS = {
    "nchw": lambda model: model.fold(),
    "channels_last": lambda model: model.fold(channels_last=True),
    "traced": lambda model: TracedGlow(model.fold(channels_last=True)),  # traced at batch 8
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_log_likelihoods_and_latents_match_the_model(name: str, form: str) -> None:
    config = CONFIGS[name]
    model = tiny_glow(config)
    folded = FORMS[form](model)
    x = images(16, config)
    with torch.inference_mode():
        reference, latents = model.log_prob_and_latents(x)
        values, folded_latents = folded.log_prob_and_latents(x)
        z, log_prob = folded.encode_with_log_prob(x)
    assert values.dtype == reference.dtype and values.shape == (16,)
    assert float(((values - reference).abs() / reference.abs()).max()) < TOLERANCE
    assert torch.equal(log_prob, values)
    for mine, theirs in zip(folded_latents, latents):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z, model.encode(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(folded.bits_per_dim(values), model.bits_per_dim(values))
    with torch.inference_mode():
        _, _, expected_levels = model.log_prob_and_levels(x)
        _, _, levels = folded.log_prob_and_levels(x)
    assert len(levels) == config.levels
    for mine, theirs in zip(levels, expected_levels):  # the folded constants are put back per level
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_inverts_encode_pixel_for_pixel(name: str, form: str) -> None:
    config = CONFIGS[name]
    model = tiny_glow(config)
    folded = FORMS[form](model)
    x = images(16, config)
    if config.n_bits < 8:  # the model sees the top n bits: those are what comes back
        x = x // 2 ** (8 - config.n_bits) * 2 ** (8 - config.n_bits)
    with torch.inference_mode():
        assert torch.equal(folded.decode(folded.encode(x)), x)
        assert torch.equal(model.decode(folded.encode(x)), x)  # and the two forms share one latent space
        assert torch.equal(folded.decode(model.encode(x)), x)


def prior_latents(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    """n flat latents of the prior at temperature 0.7."""
    return 0.7 * torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", list(FORMS))
def test_decoded_samples_match_the_model(form: str) -> None:
    model = tiny_glow()
    folded = FORMS[form](model)
    z = prior_latents(model, 64, seed=3)
    with torch.inference_mode():
        mine, theirs = folded.decode(z).int(), model.decode(z).int()
    # float rounding may move a value that lands on a bin edge by one grey level, nothing more
    assert int((mine - theirs).abs().max()) <= 1 and float((mine == theirs).double().mean()) > 0.999


@pytest.mark.parametrize("form", list(FORMS))
def test_the_in_place_steps_leave_the_callers_tensors_alone(form: str) -> None:
    model = tiny_glow()
    folded = FORMS[form](model)
    x = images(4)
    z = 0.7 * torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(5))
    x_before, z_before = x.clone(), z.clone()
    with torch.inference_mode():
        _, latents, _ = folded.log_prob_and_levels(x)
        latents_before = [eps.clone() for eps in latents]
        folded.decode(z)
        folded.log_prob(x)  # a second pass writes nothing into the first one's latents
    assert torch.equal(x, x_before) and torch.equal(z, z_before)
    assert all(torch.equal(eps, before) for eps, before in zip(latents, latents_before))


@pytest.mark.parametrize("form", list(FORMS))
def test_batches_are_scored_like_single_images(form: str) -> None:
    folded = FORMS[form](tiny_glow())
    x = images(5)
    with torch.inference_mode():
        together = folded.log_prob(x)
        alone = torch.cat([folded.log_prob(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-4)


def test_float64_models_fold_in_float64() -> None:
    model = tiny_glow(dtype=torch.float64)
    folded = model.fold()
    x = images(4)
    with torch.inference_mode():
        reference, values = model.log_prob(x), folded.log_prob(x)
    assert values.dtype == torch.float64
    assert float(((values - reference).abs() / reference.abs()).max()) < 1e-12


def test_folding_snapshots_the_parameters() -> None:
    model = tiny_glow()
    folded = model.fold()
    x = images(4)
    with torch.inference_mode():
        before = folded.log_prob(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    with torch.inference_mode():
        assert torch.equal(folded.log_prob(x), before)
        assert not torch.allclose(model.log_prob(x), before)


@pytest.mark.parametrize("form", list(FORMS))
def test_refuses_what_the_model_refuses(form: str) -> None:
    folded = FORMS[form](tiny_glow())
    with pytest.raises(TypeError, match="uint8"):
        folded.log_prob(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="latents must have shape"):
        folded.decode(torch.zeros(1, 3))


def test_the_fold_is_frozen_and_leaves_the_model_as_it_was() -> None:
    model = tiny_glow()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():  # folding inside inference mode still gives ordinary tensors
        folded = model.fold(channels_last=True)
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    assert not any(t.is_inference() for t in folded.state_dict().values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.dtype == folded.dtype == torch.float32
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in folded.parameters() if p.ndim == 4)
    x = images(4)
    with torch.no_grad():  # and it runs outside inference mode too
        torch.testing.assert_close(folded.log_prob(x), model.log_prob(x), rtol=1e-4, atol=1e-3)


def test_the_traced_form_scores_bin_centres_only() -> None:
    traced = TracedGlow(tiny_glow().fold())
    x = images(2)
    with pytest.raises(ValueError, match="bin centres only"):
        traced.log_prob(x, noise=torch.rand(x.shape))


def test_the_graphs_constants_are_inference_tensors_and_run_outside_inference_mode() -> None:
    model = tiny_glow()
    traced = TracedGlow(model.fold(channels_last=True))
    constants = [node.output().toIValue() for graph in traced._graphs.values() for node in graph.graph.nodes()
                 if node.kind() == "prim::Constant"]
    tensors = [value for value in constants if isinstance(value, torch.Tensor)]
    assert tensors and all(t.is_inference() for t in tensors)
    x = images(3)
    want = model.log_prob(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(traced.log_prob_and_levels(x)[0], want, rtol=TOLERANCE, atol=0)
    torch.testing.assert_close(traced.log_prob_and_levels(x)[0], want, rtol=TOLERANCE, atol=0)  # grad mode on
    assert torch.equal(traced.decode(traced.encode(x)), x)


@pytest.mark.parametrize("form", list(FORMS))
def test_decode_reports_the_latents_whose_inverse_overflows(form: str) -> None:
    model = tiny_glow()
    fast = FORMS[form](model)
    z = prior_latents(model, 3, seed=0)
    z[1] = 3e38  # finite in float32; the inverse's first multiplications take it past the range
    pixels, finite = fast.decode_and_finite(z)
    assert finite.tolist() == [True, False, True]
    assert torch.equal(pixels[[0, 2]], model.decode(z[[0, 2]]))
    assert torch.equal(fast.decode(z), pixels)
