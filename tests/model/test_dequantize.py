"""Variational dequantisation: q's density by the change of variables, the bound it gives, and its trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.anomaly import calibrate
from model.checkpoint import load_checkpoint, read_tensors, save_checkpoint
from model.data import fingerprint
from model.dequantize import Dequantizer, variational_bits_per_dim, variational_log_prob
from model.evaluate import bits_per_dim
from model.glow import Glow, GlowConfig
from model.train_dequantizer import main as train_main

SHAPE = (1, 4, 4)


def perturbed(dequantizer: Dequantizer, seed: int = 0, scale: float = 0.3) -> Dequantizer:
    """Its zero-initialised convolutions made non-zero, so that every coupling acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in dequantizer.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return dequantizer


def test_log_q_is_the_density_of_u_by_the_change_of_variables() -> None:
    """log q(u | x) = log N(eps) - log |det du/deps|, the Jacobian taken numerically by autograd."""
    torch.manual_seed(0)
    dequantizer = perturbed(Dequantizer(SHAPE, hidden=8, couplings=3)).double()
    x = torch.randint(0, 256, (1, *SHAPE), dtype=torch.uint8)
    eps = torch.randn(1, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        u, log_q = dequantizer(x, eps)
    jacobian = torch.autograd.functional.jacobian(lambda e: dequantizer(x, e.view(1, *SHAPE))[0].flatten(), eps.flatten())
    log_normal = -0.5 * float((eps**2).sum()) - 0.5 * eps.numel() * math.log(2 * math.pi)
    expected = log_normal - float(torch.linalg.slogdet(jacobian)[1])
    assert float(log_q) == pytest.approx(expected, abs=1e-8)
    assert ((u > 0) & (u < 1)).all()


def test_an_untrained_q_is_the_logit_normal() -> None:
    x = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    eps = torch.randn(3, *SHAPE)
    u, log_q = Dequantizer(SHAPE, hidden=8)(x, eps)
    assert torch.equal(u, torch.sigmoid(eps))
    logit_normal = (torch.distributions.Normal(0, 1).log_prob(eps) - torch.log(u * (1 - u))).flatten(1).sum(1)
    torch.testing.assert_close(log_q, logit_normal, rtol=1e-5, atol=1e-4)


def constant_images(count: int) -> torch.Tensor:
    return torch.full((count, *SHAPE), 100, dtype=torch.uint8)


def peaked_flow() -> Glow:
    """A flow initialised on images that are all the same: ActNorm scales the uniform noise of one bin to unit
    variance, so p is about a Gaussian of std 1/sqrt(12) bins around the bin centre in every dimension. Its
    mass inside the bin is P(|z| < sqrt(3)) = 0.917 per dimension, so log P(x) lies 0.127 bits/dim above the
    uniform bound (-0.5 log(2 pi / 12) - 1/2 nats per dimension): room for q to gain."""
    torch.manual_seed(0)
    flow = Glow(GlowConfig(image_shape=SHAPE, levels=1, steps_per_level=2, hidden_channels=8))
    flow.initialize(constant_images(256), torch.Generator().manual_seed(0))
    return flow.eval().requires_grad_(False)


def test_training_q_tightens_the_bound_on_a_frozen_flow() -> None:
    images = constant_images(64)
    flow = peaked_flow()
    weights = [p.clone() for p in flow.parameters()]
    dequantizer = Dequantizer(SHAPE, hidden=8, couplings=2)
    before = variational_bits_per_dim(flow, dequantizer, images)
    optimizer = torch.optim.Adam(dequantizer.parameters(), lr=3e-3)
    for step in range(150):
        x = images[torch.randint(0, len(images), (32,), generator=torch.Generator().manual_seed(step))]
        loss = flow.bits_per_dim(variational_log_prob(flow, dequantizer, x, torch.randn(x.shape))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = variational_bits_per_dim(flow, dequantizer, images)
    uniform = bits_per_dim(flow, images).dequantized
    assert after < before - 0.02, (before, after)
    assert after < uniform - 0.05, (uniform, after)  # tighter than U[0, 1): q learnt p's shape inside the bins
    assert variational_bits_per_dim(flow, dequantizer, images, samples=8) <= after + 1e-3  # IW: tighter still
    assert all(torch.equal(a, b) for a, b in zip(weights, flow.parameters()))  # the flow itself untouched


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny checkpoint whose sidecar records its training file, and a test file."""
    images = constant_images(96)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, images=images[:, 0].numpy())  # (N, H, W): grey
    np.savez(test, images=np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8))
    flow = peaked_flow()
    meta = {"name": "tiny", "dataset": {"name": "synthetic", "train_files": fingerprint([train]), "val_count": 16}}
    save_checkpoint(flow, tmp_path / "ckpt", meta, calibrate(flow, images[-16:]))
    return tmp_path / "ckpt", train, test


def test_the_trainer_writes_q_and_its_three_figures(recorded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, train, test = recorded
    run = tmp_path / "run"
    argv = ["--weights", str(checkpoint), "--train", str(train), "--test", str(test), "--output", str(run),
            "--max-steps", "6", "--batch-size", "8", "--hidden", "4", "--couplings", "1", "--samples", "2"]
    assert train_main(argv) == 0
    record = json.loads((run / "dequantizer.json").read_text())
    figures = record["test_bits_per_dim"]
    assert figures["test_images"] == 40 and figures["importance_samples"] == 2
    assert all(math.isfinite(figures[key]) for key in ("uniform", "variational", "importance_weighted"))
    flow = load_checkpoint(checkpoint).model
    assert figures["uniform"] == pytest.approx(bits_per_dim(flow, torch.as_tensor(np.load(test)["images"][:, None])).dequantized)
    assert record["flow_sha256"] == json.loads((checkpoint / "glow.json").read_text())["weights_sha256"]
    tensors, meta = read_tensors(run / "dequantizer.safetensors")
    restored = Dequantizer(SHAPE, hidden=4, couplings=1)
    restored.load_state_dict(tensors)
    assert json.loads(meta["config"]) == restored.config()
    assert train_main([*argv, "--resume", "--max-steps", "8"]) == 0  # continues from step 6
    assert json.loads((run / "dequantizer.json").read_text())["steps"] == 8


def test_the_trainer_refuses_other_training_data(recorded: tuple[Path, Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, _, test = recorded
    assert train_main(["--weights", str(checkpoint), "--train", str(test), "--test", str(test),
                       "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
