"""Heatmaps: calibration, where they point, finiteness, the sidecar round trip, the tap and the overlay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import sha256_file
from model.evaluate_heatmap import KINDS, paste_patches
from model.glow import Glow, GlowConfig
from model.heatmap import SIDECAR_KEY, HeatmapCalibration, LatentTap, calibrate, level_weights, main, overlay

CONFIG = GlowConfig(image_shape=(1, 16, 16), levels=2, steps_per_level=2, hidden_channels=16)


def blobs(n: int, seed: int) -> torch.Tensor:
    """Soft bright discs on black, 16x16: the in-distribution of these tests."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:16, :16]
    images = np.zeros((n, 1, 16, 16), dtype=np.uint8)
    for i in range(n):
        r, c = rng.uniform(6, 10, 2)
        images[i, 0] = (rng.uniform(150, 250) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 12)).astype(np.uint8)
    return torch.from_numpy(images)


@pytest.fixture(scope="module")
def model() -> Glow:
    """A tiny Glow fitted for 150 steps to the discs (one thread: small convolutions gain nothing from more)."""
    torch.manual_seed(0)
    glow = Glow(CONFIG)
    data = blobs(512, seed=0)
    glow.initialize(data[:128])
    optimizer = torch.optim.Adam(glow.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            batch = data[torch.randint(0, len(data), (32,), generator=generator)]
            loss = glow.bits_per_dim(glow(batch, torch.rand(batch.shape, generator=generator))).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return glow.eval()


@pytest.fixture(scope="module")
def heat_calibration(model: Glow) -> HeatmapCalibration:
    return calibrate(model, blobs(400, seed=1), (16, 16))


def test_calibration_has_one_grid_per_level_and_a_positive_overlay_scale(
    model: Glow, heat_calibration: HeatmapCalibration
) -> None:
    assert [tuple(m.shape) for m in heat_calibration.mean] == [s[1:] for s in model.latent_shapes]
    assert all((s > 0).all() for s in heat_calibration.std)
    assert math.isfinite(heat_calibration.overlay_max) and heat_calibration.overlay_max > 0


def test_maps_point_at_a_pasted_noise_patch(model: Glow, heat_calibration: HeatmapCalibration) -> None:
    base = blobs(60, seed=2).numpy()
    patched = paste_patches(base, "noise", base, np.random.default_rng(0))
    maps = heat_calibration.maps(model.log_prob_and_levels(patched.images)[1], (16, 16))
    assert maps.shape == (60, 16, 16)
    assert roc_auc_score(patched.masks.ravel(), maps.numpy().ravel()) > 0.8
    clean = heat_calibration.maps(model.log_prob_and_levels(torch.from_numpy(base))[1], (16, 16))
    assert clean.mean() < maps.mean()


def test_maps_are_finite_non_negative_and_capped_for_latents_that_overflow(
    heat_calibration: HeatmapCalibration,
) -> None:
    latents = [torch.full((2, 2, 8, 8), 1e30), torch.tensor([math.nan, math.inf]).reshape(2, 1, 1, 1).expand(2, 8, 4, 4)]
    maps = heat_calibration.maps(latents, (16, 16))
    assert torch.isfinite(maps).all() and (maps >= 0).all()


def test_level_weights_double_per_coarser_level() -> None:
    assert level_weights(1) == [1.0]
    assert level_weights(3) == [0.25, 0.5, 1.0]


def test_the_tap_records_the_pass_and_changes_nothing(model: Glow) -> None:
    x = blobs(5, seed=3)
    folded = model.fold()
    tap = LatentTap(folded)
    log_prob, latents, _ = tap.log_prob_and_levels(x)
    assert torch.equal(log_prob, folded.log_prob_and_levels(x)[0])
    assert tap.latents is latents and tap.bits_per_dim(log_prob).shape == (5,)


def test_json_round_trip_and_refusals(model: Glow, heat_calibration: HeatmapCalibration) -> None:
    data = json.loads(json.dumps(heat_calibration.to_json()))
    again = HeatmapCalibration.from_json(data, model.latent_shapes)
    x = blobs(4, seed=4)
    latents = model.log_prob_and_levels(x)[1]
    assert torch.allclose(again.maps(latents, (16, 16)), heat_calibration.maps(latents, (16, 16)))
    with pytest.raises(ValueError, match="grids"):
        HeatmapCalibration.from_json(data, [(2, 4, 4), (8, 2, 2)])
    broken = {**data, "energy_std": [[[0.0] * 8] * 8, data["energy_std"][1]]}
    with pytest.raises(ValueError, match="positive"):
        HeatmapCalibration.from_json(broken, model.latent_shapes)
    with pytest.raises(ValueError, match="malformed"):
        HeatmapCalibration.from_json({"energy_mean": []}, model.latent_shapes)


def test_the_command_refuses_other_data_than_the_checkpoints(model: Glow, tmp_path: Path) -> None:
    train = tmp_path / "train.npz"
    np.savez(train, images=blobs(64, seed=5).numpy()[:, 0])
    save_checkpoint(model, tmp_path / "ckpt", {"dataset": {"val_count": 32, "train_files": {"x": "0" * 64}}})
    assert main(["--weights", str(tmp_path / "ckpt"), "--train", str(train)]) == 2


def test_the_command_writes_the_sidecar_and_keeps_the_weights(model: Glow, tmp_path: Path) -> None:
    train = tmp_path / "train.npz"
    np.savez(train, images=blobs(64, seed=5).numpy()[:, 0])  # (N, H, W)
    # the held-out split is checked against the training file it was held out of (model.calibrate.held_out_indices)
    weights = save_checkpoint(model, tmp_path / "ckpt",
                              {"dataset": {"val_count": 32, "train_files": {"train.npz": sha256_file(train)}}})
    sha = load_checkpoint(weights).meta["weights_sha256"]
    assert main(["--weights", str(tmp_path / "ckpt"), "--train", str(train)]) == 0
    checkpoint = load_checkpoint(weights)
    assert checkpoint.meta["weights_sha256"] == sha
    HeatmapCalibration.from_json(checkpoint.meta[SIDECAR_KEY], model.latent_shapes)
    assert main(["--weights", str(tmp_path / "missing"), "--train", str(train)]) == 2


def test_overlay_leaves_cold_pixels_grey_and_paints_hot_ones_red() -> None:
    pixels = np.full((1, 4, 4), 100, dtype=np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 10.0
    rgb = overlay(pixels, heat, overlay_max=2.0)
    assert rgb.shape == (3, 4, 4) and rgb.dtype == np.uint8
    assert (rgb[:, 1:, 1:] == 100).all()
    assert rgb[0, 0, 0] > 200 and rgb[2, 0, 0] < 30


@pytest.mark.parametrize("kind", KINDS)
def test_patches_are_pasted_where_the_mask_says(kind: str) -> None:
    base = blobs(20, seed=6).numpy()
    digits = np.zeros((3, 1, 28, 28), dtype=np.uint8)
    digits[:, 0, 6:22, 13:15] = 255  # a "1"
    patched = paste_patches(base, kind, digits, np.random.default_rng(1))
    outside = ~patched.masks[:, None]
    assert (patched.images.numpy()[np.broadcast_to(outside, base.shape)] == base[np.broadcast_to(outside, base.shape)]).all()
    sides = np.sqrt(patched.masks.sum((1, 2)))
    assert ((sides >= 7) & (sides <= 11) & (sides == sides.round())).all()
    assert not (patched.changed & ~patched.masks).any()


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_the_shipped_checkpoints_carry_a_usable_heatmap_calibration(name: str) -> None:
    sidecar = json.loads((Path(__file__).resolve().parents[2] / "weights" / name / "glow.json").read_text())
    shapes = Glow(GlowConfig.from_dict(sidecar["config"])).latent_shapes
    calibration = HeatmapCalibration.from_json(sidecar[SIDECAR_KEY], shapes)
    assert 1 < calibration.overlay_max < 1e3
