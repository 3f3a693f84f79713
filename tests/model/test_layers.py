"""Every flow layer: exact inverse, log-det against a brute-force Jacobian, gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from model.layers import (
    ActNorm,
    AffineCoupling,
    ConditionalPrior,
    Conv1x1,
    FlowStep,
    InvertibleConv1x1,
    Squeeze,
    TopPrior,
    ZeroConv2d,
)

SHAPE = (2, 4, 4, 4)  # (B, C, H, W): D = 64 per row, small enough for a full Jacobian


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its (often identity) initial value, in float64."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "actnorm": lambda: perturbed(ActNorm(4)),
    "invconv": lambda: perturbed(InvertibleConv1x1(4, torch.Generator().manual_seed(1))),
    "coupling": lambda: perturbed(AffineCoupling(4, hidden=6)),
    "flowstep": lambda: perturbed(FlowStep(4, hidden=6, generator=torch.Generator().manual_seed(2))),
    "squeeze": lambda: Squeeze().double(),
    "conditional_prior": lambda: perturbed(ConditionalPrior(4)),
    "top_prior": lambda: perturbed(TopPrior(4, 4, 4)),
}


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(params=sorted(LAYERS), ids=sorted(LAYERS))
def layer(request: pytest.FixtureRequest) -> nn.Module:
    return LAYERS[request.param]()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inverse_undoes_forward(layer: nn.Module, training: bool) -> None:
    layer.train(training)
    x = inputs()
    y, _ = layer(x)
    x_back, _ = layer.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    assert y.shape != x.shape or not torch.allclose(y, x), "the layer should not be the identity here"


def test_logdet_matches_brute_force_jacobian(layer: nn.Module) -> None:
    x = inputs(1)
    _, logdet = layer(x)
    assert logdet.shape == (SHAPE[0],)
    for row in range(SHAPE[0]):
        def f(v: torch.Tensor) -> torch.Tensor:
            return layer(v.reshape(1, *SHAPE[1:]))[0].flatten()

        jacobian = torch.autograd.functional.jacobian(f, x[row].flatten(), vectorize=True)
        sign, expected = torch.linalg.slogdet(jacobian)
        assert sign != 0
        torch.testing.assert_close(logdet[row], expected, rtol=1e-9, atol=1e-9)


def test_inverse_logdet_is_minus_forward(layer: nn.Module) -> None:
    x = inputs(2)
    y, forward_logdet = layer(x)
    _, inverse_logdet = layer.inverse(y)
    torch.testing.assert_close(inverse_logdet, -forward_logdet, rtol=1e-10, atol=1e-10)


def test_every_parameter_gets_a_gradient(layer: nn.Module) -> None:
    x = inputs(3).requires_grad_(True)
    y, logdet = layer(x)
    (y.square().sum() + logdet.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_squeeze_is_a_space_to_depth_permutation() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y, logdet = Squeeze()(x)
    assert y.shape == (1, 4, 2, 2)
    # channel (dy, dx) holds pixel (2i + dy, 2j + dx)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, 3, 1, 1].item() == 15.0
    assert logdet.tolist() == [0.0]
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


def test_actnorm_initialize_normalises_the_batch_and_is_stored() -> None:
    x = 3.0 + 2.0 * torch.randn(64, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    norm = ActNorm(3)
    assert not norm.initialized
    norm.initialize(x)
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert "initialized" in norm.state_dict() and bool(norm.state_dict()["initialized"])
    bias = norm.bias.detach().clone()
    norm(torch.randn(8, 3, 5, 5))  # forward never re-initialises
    assert torch.equal(norm.bias, bias)
    restored = ActNorm(3)
    restored.load_state_dict(norm.state_dict())
    assert bool(restored.initialized) and torch.equal(restored.bias, bias)


FOLDABLE = sorted(name for name in LAYERS if name != "squeeze")


@pytest.mark.parametrize("name", FOLDABLE)
def test_fold_is_the_same_bijection(name: str) -> None:
    layer = LAYERS[name]().eval()
    folded = layer.fold()
    x = inputs(4)
    y, logdet = layer(x)
    folded_y, folded_logdet = folded(x)
    torch.testing.assert_close(folded_y, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded_logdet, logdet, rtol=1e-12, atol=1e-12)
    back, inverse_logdet = folded.inverse(y)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-12, atol=1e-12)
    assert all(not a.is_set_to(b) for a in layer.parameters() for b in folded.parameters())  # a copy


def test_a_flow_step_folds_its_actnorm_into_the_1x1_conv() -> None:
    step = LAYERS["flowstep"]()
    folded = step.fold()
    mix, coupling = folded.children()
    assert isinstance(mix, Conv1x1) and isinstance(coupling, AffineCoupling)
    assert not any(isinstance(m, (ActNorm, ZeroConv2d)) for m in folded.modules())


def test_the_plain_layers_run_in_and_out_of_inference_mode() -> None:
    conv = InvertibleConv1x1(4, torch.Generator().manual_seed(0)).eval()
    x = torch.randn(3, 4, 2, 2)
    with torch.inference_mode():
        y, _ = conv(x)
        back, _ = conv.inverse(y)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    y, logdet = conv(x)  # nothing made under inference mode is reused with autograd on
    (y.sum() + logdet.sum()).backward()
    assert conv.log_s.grad is not None


def test_invconv_logdet_is_sum_of_log_s_times_pixels() -> None:
    conv = InvertibleConv1x1(5, torch.Generator().manual_seed(0)).double()
    weight = conv.weight()
    torch.testing.assert_close(torch.linalg.slogdet(weight)[1], conv.log_s.sum())
    _, logdet = conv(torch.randn(2, 5, 3, 7, dtype=torch.float64))
    torch.testing.assert_close(logdet, conv.log_s.sum().expand(2) * 21)


def test_the_coupling_in_place_is_the_same_bijection_written_into_its_input() -> None:
    coupling = LAYERS["coupling"]().eval()
    x = inputs(5)
    with torch.no_grad():
        y, log_scale = coupling.couple(x)
        buffer = x.clone()
        y_in_place, log_scale_in_place = coupling.couple(buffer, in_place=True)
        assert y_in_place is buffer and torch.equal(y_in_place, y) and torch.equal(log_scale_in_place, log_scale)
        back, inverse_log_scale = coupling.uncouple(buffer, in_place=True)
        assert back is buffer and torch.equal(inverse_log_scale, log_scale)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
        torch.testing.assert_close(coupling(x)[1], log_scale.sum((1, 2, 3)), rtol=0, atol=0)  # log|det|: the map's sum
