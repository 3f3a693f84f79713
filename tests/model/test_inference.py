"""The folded inference form (eager and TorchScript) against the model it folds: same likelihoods, latents, images."""

from __future__ import annotations

import pytest
import torch
from test_glow import TINY, images, tiny_glow

from model.glow import GlowConfig
from model.inference import Float64Fallback, FoldedGlow, TracedGlow

CONFIGS = {
    "grey": TINY,
    "rgb, 3 levels": GlowConfig(image_shape=(3, 8, 8), levels=3, steps_per_level=2, hidden_channels=8),
    "5 bits": GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=3, hidden_channels=8, n_bits=5),
}
TOLERANCE = 1e-4  # relative, on log-likelihoods: the bound for any optimisation
FORMS = {
    "nchw": lambda model: FoldedGlow(model),
    "channels_last": lambda model: FoldedGlow(model, channels_last=True),
    "traced": lambda model: TracedGlow(FoldedGlow(model, channels_last=True)),  # traced at batch 8
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


@pytest.mark.parametrize("form", list(FORMS))
def test_decoded_samples_match_the_model(form: str) -> None:
    model = tiny_glow()
    folded = FORMS[form](model)
    z = 0.7 * torch.randn(64, model.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        mine, theirs = folded.decode(z).int(), model.decode(z).int()
    # float rounding may move a value that lands on a bin edge by one grey level, nothing more
    assert int((mine - theirs).abs().max()) <= 1 and float((mine == theirs).double().mean()) > 0.999


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
    folded = FoldedGlow(model)
    x = images(4)
    with torch.inference_mode():
        reference, values = model.log_prob(x), folded.log_prob(x)
    assert values.dtype == torch.float64
    assert float(((values - reference).abs() / reference.abs()).max()) < 1e-12


def test_folding_snapshots_the_parameters() -> None:
    model = tiny_glow()
    folded = FoldedGlow(model)
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


def test_the_float64_fallback_recomputes_only_the_rows_float32_cannot_score() -> None:
    model = tiny_glow()
    folded = FoldedGlow(model)
    x = images(4)

    class Overflowing:
        """The folded form, but float32 'overflows' on image 1 (its latents) and image 3 (its log-likelihood)."""

        def log_prob_and_levels(self, x: torch.Tensor):
            log_prob, latents, levels = folded.log_prob_and_levels(x)
            latents[0][1] = float("inf")
            log_prob[3] = float("nan")
            return log_prob, latents, levels

        def encode_with_log_prob(self, x: torch.Tensor):
            z, log_prob = folded.encode_with_log_prob(x)
            z[1, 0] = float("inf")
            return z, log_prob

    safe = Float64Fallback(Overflowing(), model)
    with torch.inference_mode():
        exact = safe.exact_model().log_prob_and_levels(x)
        fast = folded.log_prob_and_levels(x)
        log_prob, latents, levels = safe.log_prob_and_levels(x)
        assert log_prob.dtype == torch.float64
        for got, want_exact, want_fast in zip([log_prob, *latents, *levels], [exact[0], *exact[1], *exact[2]],
                                              [fast[0], *fast[1], *fast[2]]):
            torch.testing.assert_close(got[[1, 3]], want_exact[[1, 3]], rtol=1e-10, atol=1e-10)  # recomputed
            assert torch.equal(got[[0, 2]], want_fast[[0, 2]].double())  # untouched
        z, _ = safe.encode_with_log_prob(x)
        torch.testing.assert_close(z[1], safe.exact_model().encode(x)[1], rtol=1e-10, atol=1e-10)
        assert torch.equal(z[0], folded.encode(x)[0].double())
        # a batch float32 scores comes back from the fast form as it is
        plain = Float64Fallback(folded, model)
        assert plain.log_prob_and_levels(x)[0].dtype == torch.float32
        assert plain._exact is None  # no float64 copy made


def test_the_float64_fallback_takes_an_empty_batch_and_leaves_float64_outputs_alone() -> None:
    model = tiny_glow()
    safe = Float64Fallback(FoldedGlow(model), model)
    with torch.inference_mode():
        log_prob, latents, levels = safe.log_prob_and_levels(images(0))
        z, _ = safe.encode_with_log_prob(images(0))
    assert log_prob.shape == (0,) and z.shape == (0, model.latent_dim)
    x = images(2)
    model64 = tiny_glow(dtype=torch.float64)
    fast = model64.log_prob_and_levels(x)[0]

    class NaNOnTheFirst:
        def log_prob_and_levels(self, images: torch.Tensor):
            out = fast.clone()
            out[0] = float("nan")
            self.output = out
            return out, [], []

    nan_first = NaNOnTheFirst()
    log_prob, _, _ = Float64Fallback(nan_first, model64).log_prob_and_levels(x)
    assert torch.isfinite(log_prob).all() and torch.isnan(nan_first.output[0])  # merged into a copy
