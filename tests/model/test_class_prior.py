"""The class-conditional top prior (model/class_prior.py) and the Glow that carries it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.class_prior import ClassPrior
from model.glow import Glow, GlowConfig
from model.inference import TracedGlow

SHAPE = (1, 8, 8)
LABELS = ("a", "b", "c")


def conditional_glow(seed: int = 0, labels: tuple[str, ...] = LABELS) -> tuple[Glow, torch.Tensor]:
    """A tiny initialised class-conditional Glow with its class Gaussians drawn apart, and its init batch."""
    torch.manual_seed(seed)
    model = Glow(GlowConfig(SHAPE, levels=2, steps_per_level=2, hidden_channels=8, labels=labels))
    x = torch.randint(0, 256, (12, *SHAPE), dtype=torch.uint8)
    model.initialize(x)
    with torch.no_grad():
        model.class_prior.mean.normal_(0.0, 0.7)
        model.class_prior.log_sigma.uniform_(-0.3, 0.3)
        model.class_prior.set_frequencies(torch.tensor([0, 0, 1, 2, 2, 2]))
    return model.eval(), x


def test_a_zero_initialised_class_prior_is_the_unconditional_model() -> None:
    torch.manual_seed(1)
    conditional = Glow(GlowConfig(SHAPE, 2, 2, 8, labels=LABELS))
    x = torch.randint(0, 256, (6, *SHAPE), dtype=torch.uint8)
    conditional.initialize(x)
    plain = Glow(GlowConfig(SHAPE, 2, 2, 8))
    plain.load_state_dict({k: v for k, v in conditional.state_dict().items() if not k.startswith("class_prior.")})
    with torch.no_grad():
        assert torch.allclose(conditional.log_prob(x), plain.log_prob(x), rtol=1e-6)
        for k in range(len(LABELS)):  # every class starts as N(0, I)
            assert torch.allclose(conditional.log_prob(x, labels=torch.full((6,), k)), plain.log_prob(x), rtol=1e-6)


def test_log_p_of_x_is_the_mixture_and_the_posterior_bayes_rule() -> None:
    model, x = conditional_glow()
    with torch.no_grad():
        log_px, latents, _ = model.log_prob_and_levels(x)
        given = torch.stack([model.log_prob(x, labels=torch.full((len(x),), k)) for k in range(3)], dim=1)
        log_pi = torch.log(torch.tensor([2 / 6, 1 / 6, 3 / 6]))
        assert torch.allclose(log_px, torch.logsumexp(given + log_pi, dim=1), rtol=1e-5)
        posterior = model.class_log_posterior(latents[-1]).exp()
    assert torch.allclose(posterior, torch.softmax(given + log_pi, dim=1), atol=1e-5)
    assert torch.allclose(posterior.sum(1), torch.ones(len(x)))


def test_each_class_gaussian_is_the_closed_form_density() -> None:
    prior = ClassPrior(2, (1, 1, 2))
    with torch.no_grad():
        prior.mean.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 1, 2))
        prior.log_sigma.copy_(torch.tensor([0.0, math.log(2.0)]).view(2, 1, 1, 1).expand(2, 1, 1, 2))
    eps = torch.tensor([[[[1.0, 3.0]]]])
    expected = [sum(-0.5 * ((v - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi) for v in (1.0, 3.0))
                for m, s in ((0.0, 1.0), (1.0, 2.0))]
    assert torch.allclose(prior.log_likelihoods(eps), torch.tensor([expected]), atol=1e-6)


def test_frequencies_must_cover_every_class() -> None:
    prior = ClassPrior(3, (1, 2, 2))
    with pytest.raises(ValueError, match="each at least once"):
        prior.set_frequencies(torch.tensor([0, 1, 1]))
    prior.set_frequencies(torch.tensor([0, 1, 2, 2]))
    assert torch.allclose(prior.log_weights.exp(), torch.tensor([0.25, 0.25, 0.5]))


@pytest.mark.parametrize("labels", [("one",), ("a", "a"), ("a", "")])
def test_configs_refuse_bad_label_lists(labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="labels"):
        GlowConfig(SHAPE, 2, 2, 8, labels=labels)


def test_samples_of_a_class_come_from_its_gaussian() -> None:
    model, _ = conditional_glow()
    z = model.sample_latents(2000, temperature=0.5, seed=0, label=2)
    top = z[:, -math.prod(model.latent_shapes[-1]):].view(-1, *model.latent_shapes[-1])
    mean, sigma = model.class_prior.mean[2].double(), model.class_prior.log_sigma[2].exp().double()
    assert torch.allclose(top.mean(0), mean, atol=0.1)
    assert torch.allclose(top.std(0), 0.5 * sigma, rtol=0.15)
    lower = z[:, : -math.prod(model.latent_shapes[-1])]
    assert abs(float(lower.std()) - 0.5) < 0.02  # the other levels: N(0, T^2) as unconditional


def test_unlabelled_samples_draw_classes_with_the_training_frequencies() -> None:
    model, _ = conditional_glow()
    labels = model.class_prior.draw_labels(6000, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(labels, minlength=3) / 6000.0, torch.tensor([2 / 6, 1 / 6, 3 / 6]), atol=0.02)
    assert torch.equal(model.sample(3, seed=4), model.sample(3, seed=4))


def test_labels_are_refused_where_they_mean_nothing() -> None:
    model, x = conditional_glow()
    with pytest.raises(ValueError, match="3 classes"):
        model.sample(1, label=3)
    plain = Glow(GlowConfig(SHAPE, 2, 2, 8))
    with pytest.raises(ValueError, match="classes"):
        plain.sample(1, label=0)
    with pytest.raises(ValueError, match="unconditional"):
        plain.log_prob(x, labels=torch.zeros(len(x), dtype=torch.long))


def test_the_folded_and_traced_forms_keep_the_mixture_and_the_posterior() -> None:
    model, x = conditional_glow()
    with torch.no_grad():
        log_px, latents, _ = model.log_prob_and_levels(x)
        posterior = model.class_log_posterior(latents[-1])
        for form in (model.fold(), TracedGlow(model.fold())):
            got, got_latents, _ = form.log_prob_and_levels(x)
            assert torch.allclose(got, log_px, rtol=1e-5)
            assert torch.allclose(form.class_log_posterior(got_latents[-1]), posterior, atol=1e-4)
            assert torch.equal(form.sample(2, seed=1, label=1), model.sample(2, seed=1, label=1))


def test_a_conditional_checkpoint_round_trips_and_old_configs_still_load(tmp_path: Path) -> None:
    model, x = conditional_glow()
    save_checkpoint(model, tmp_path / "c", {"name": "c", "dataset": {"name": "s"}, "metrics": {}}, {})
    loaded = load_checkpoint(tmp_path / "c").model
    assert loaded.config.labels == LABELS
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    assert GlowConfig.from_dict({"image_shape": [1, 8, 8], "levels": 2, "steps_per_level": 2,
                                 "hidden_channels": 8, "n_bits": 8}).labels == ()


def test_the_fitted_gaussians_maximise_the_likelihood_of_the_latents() -> None:
    """At the closed-form fit the gradient of sum log N(eps_i; m_{y_i}, s_{y_i}) vanishes."""
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    eps = torch.randn(60, 2, 2, 2) * (1 + labels.view(-1, 1, 1, 1)) + labels.view(-1, 1, 1, 1).float()
    prior = ClassPrior(3, (2, 2, 2))
    prior.fit(eps, labels)
    assert torch.allclose(prior.mean[1], eps[labels == 1].mean(0), atol=1e-6)
    prior.log_likelihood_of(eps, labels).sum().backward()
    assert float(prior.mean.grad.abs().max()) < 1e-3 and float(prior.log_sigma.grad.abs().max()) < 1e-3
    with pytest.raises(ValueError, match="class 2: 1 images"):
        prior.fit(eps[:5], labels[:5])
