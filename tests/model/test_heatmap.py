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
from model.heatmap import (
    SHIPPED,
    SIDECAR_KEY,
    VERSION_1,
    HeatmapCalibration,
    LatentTap,
    MapMethod,
    calibrate,
    gaussian_filter,
    level_weights,
    main,
    overlay,
)

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
    # 7-11 px patches on 16x16 images cover a third of the image or more, and sigma = 3 px blurs their edges
    assert roc_auc_score(patched.masks.ravel(), maps.numpy().ravel()) > 0.75
    clean = heat_calibration.maps(model.log_prob_and_levels(torch.from_numpy(base))[1], (16, 16))
    assert clean.mean() < maps.mean()


def test_maps_are_finite_non_negative_and_capped_for_latents_that_overflow(
    heat_calibration: HeatmapCalibration,
) -> None:
    latents = [torch.full((2, 2, 8, 8), 1e30), torch.tensor([math.nan, math.inf]).reshape(2, 1, 1, 1).expand(2, 8, 4, 4)]
    maps = heat_calibration.maps(latents, (16, 16))
    assert torch.isfinite(maps).all() and (maps >= 0).all()


def test_level_weights_grow_by_the_ratio_per_coarser_level() -> None:
    assert level_weights(1, 4.0) == [1.0]
    assert level_weights(3, 2.0) == [0.25, 0.5, 1.0]
    assert level_weights(2, 4.0) == [0.25, 1.0]


def test_the_gaussian_filter_keeps_a_constant_map_and_spreads_a_point() -> None:
    flat = torch.full((2, 5, 7), 3.0, dtype=torch.float64)
    assert torch.allclose(gaussian_filter(flat, 3.0), flat)  # renormalised at the borders, even radius > size
    point = torch.zeros(1, 15, 15, dtype=torch.float64)
    point[0, 7, 7] = 1.0
    spread = gaussian_filter(point, 1.0)[0]
    assert spread[7, 7] == spread.max() and math.isclose(float(spread.sum()), 1.0, rel_tol=1e-9)
    assert torch.allclose(spread, spread.T) and spread[7, 5] < spread[7, 6] < spread[7, 7]


def test_a_map_counts_what_stands_out_of_its_image() -> None:
    """image_mean_weight a: heat = max(0, m - a * mean(m)); a uniform energy excess leaves nothing."""
    zero, one = (torch.zeros(4, 4, dtype=torch.float64),), (torch.ones(4, 4, dtype=torch.float64),)
    method = MapMethod(level_ratio=2.0, pool=1, log=False, sigma=0.0, image_mean_weight=1.0)
    calibration = HeatmapCalibration(zero, one, 1.0, method)
    uniform = torch.full((1, 1, 4, 4), 2.0)  # energy 4 everywhere: z = 4
    assert calibration.maps([uniform], (8, 8)).abs().max() == 0
    spot = torch.zeros(1, 1, 4, 4)
    spot[0, 0, 1, 1] = 3.0
    heat = calibration.maps([spot], (8, 8))[0]
    assert heat[2:4, 2:4].min() > 0 and heat[6:, 6:].max() == 0


def test_maps_of_the_method_parameters(model: Glow, heat_calibration: HeatmapCalibration) -> None:
    """Each parameter does what MapMethod says: version 1 is the plain weighted sum of clamped z-scores."""
    x = blobs(6, seed=7)
    latents = model.log_prob_and_levels(x)[1]
    version_1 = HeatmapCalibration(heat_calibration.mean, heat_calibration.std, 1.0, VERSION_1)
    expected = torch.zeros(6, 16, 16, dtype=torch.float64)
    for weight, eps, mean, std in zip([0.5, 1.0], latents, heat_calibration.mean, heat_calibration.std):
        z = ((eps.double().square().sum(1) - mean) / std).clamp(min=0)
        expected += weight * torch.nn.functional.interpolate(z[:, None], size=(16, 16), mode="bilinear")[:, 0]
    assert torch.allclose(version_1.maps(latents, (16, 16)), expected)
    logged = HeatmapCalibration(heat_calibration.mean, heat_calibration.std, 1.0,
                                MapMethod(level_ratio=2.0, pool=1, log=True, sigma=0.0, image_mean_weight=0.0))
    assert (logged.maps(latents, (16, 16)) <= expected + 1e-12).all()  # log(1 + z) <= z
    assert heat_calibration.method == SHIPPED


def test_method_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="odd"):
        MapMethod(level_ratio=2.0, pool=2, log=False, sigma=0.0, image_mean_weight=0.0)
    with pytest.raises(ValueError, match="image_mean_weight"):
        MapMethod(level_ratio=2.0, pool=1, log=False, sigma=0.0, image_mean_weight=1.5)
    with pytest.raises(ValueError, match="sigma"):
        MapMethod(level_ratio=2.0, pool=1, log=False, sigma=math.nan, image_mean_weight=0.0)
    with pytest.raises(ValueError, match="level_ratio"):
        MapMethod(level_ratio=0.0, pool=1, log=False, sigma=0.0, image_mean_weight=0.0)


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
    for bad in ({"log": "yes"}, {"pool": 2}, {"pool": True}, {"sigma": None}, {"version": 3}, {"level_ratio": -1}):
        with pytest.raises(ValueError):
            HeatmapCalibration.from_json({**data, **bad}, model.latent_shapes)
    with pytest.raises(ValueError, match="malformed"):
        HeatmapCalibration.from_json([1, 2], model.latent_shapes)


def test_a_version_1_entry_is_read_as_the_version_1_map(model: Glow, heat_calibration: HeatmapCalibration) -> None:
    """Sidecars written before the map's parameters were stored: no "version", no parameters."""
    data = heat_calibration.to_json()
    assert data["version"] == 2 and data["pool"] == SHIPPED.pool
    old = {key: data[key] for key in ("energy_mean", "energy_std", "overlay_max")}
    calibration = HeatmapCalibration.from_json(old, model.latent_shapes)
    assert calibration.method == VERSION_1
    latents = model.log_prob_and_levels(blobs(3, seed=8))[1]
    version_1 = HeatmapCalibration(heat_calibration.mean, heat_calibration.std, heat_calibration.overlay_max, VERSION_1)
    assert torch.allclose(calibration.maps(latents, (16, 16)), version_1.maps(latents, (16, 16)))


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


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "fashion-mnist-classes", "mnist-classes", "photos"])
def test_the_shipped_checkpoints_carry_a_usable_heatmap_calibration(name: str) -> None:
    sidecar = json.loads((Path(__file__).resolve().parents[2] / "weights" / name / "glow.json").read_text())
    shapes = Glow(GlowConfig.from_dict(sidecar["config"])).latent_shapes
    calibration = HeatmapCalibration.from_json(sidecar[SIDECAR_KEY], shapes)
    assert calibration.method == SHIPPED
    assert 0.1 < calibration.overlay_max < 1e3
