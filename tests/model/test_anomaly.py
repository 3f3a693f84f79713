"""Anomaly scores: deterministic, batch-invariant, calibrated, and separating the obviously different."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.anomaly import (
    DETECTORS,
    LOG_LIKELIHOOD_FLOOR,
    ORIENTATION,
    SCORE_CAP,
    AnomalyScorer,
    calibrate,
    compressed_bits_per_dim,
    features,
    method_name,
    reference_key,
    rows_for,
)
from model.checkpoint import load_checkpoint, save_checkpoint
from model.evaluate import detection, synthetic_set
from model.evaluate import main as evaluate_main
from model.glow import Glow, GlowConfig

GLOBAL = next(row for row in DETECTORS if row.name == "global")
REFERENCE_KEY, ORIENTED_REFERENCE_KEY = reference_key(rows_for(False)), reference_key(rows_for(True))
CONFIG = GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=2, hidden_channels=16)


def squares(n: int, seed: int) -> torch.Tensor:
    """Bright squares on black, 8x8: the in-distribution of these tests."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    for i in range(n):
        top, left = rng.integers(0, 4, size=2)
        images[i, 0, top : top + 4, left : left + 4] = rng.integers(150, 256)
    return torch.from_numpy(images)


def fit(glow: Glow, data: torch.Tensor, seed: int, steps: int = 150) -> None:
    """A few Adam steps of the flow on random batches of ``data``."""
    optimizer = torch.optim.Adam(glow.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (64,), generator=generator)]
        loss = glow.bits_per_dim(glow(batch, torch.rand(batch.shape, generator=generator))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def model() -> Glow:
    """A tiny Glow fitted for a few hundred steps to the squares."""
    torch.manual_seed(0)
    glow = Glow(CONFIG)
    data = squares(512, seed=0)
    glow.initialize(data[:128])
    fit(glow, data, seed=0)
    return glow.eval()


@pytest.fixture(scope="module")
def calibration(model: Glow) -> dict[str, torch.Tensor]:
    return calibrate(model, squares(400, seed=1))


def test_calibration_lists_every_row_it_fitted_and_a_reference_per_method(
        calibration: dict[str, torch.Tensor]) -> None:
    rows = DETECTORS + (ORIENTATION,)
    assert {key.split(".")[1] for key in calibration if key.endswith(".z")} == {row.name for row in rows}
    for row in rows:
        mean, std = calibration[f"anomaly.{row.name}.z"].tolist()
        assert math.isfinite(mean) and std > 0
        assert calibration[f"anomaly.{row.name}.row"].tolist() == [row.weight, float(row.two_sided)]
    for key in (REFERENCE_KEY, ORIENTED_REFERENCE_KEY):
        assert calibration[key].shape == (200,)  # the second half
        assert torch.isfinite(calibration[key]).all() and (calibration[key] >= 0).all()  # every term is >= 0
    assert method_name(rows_for(False)) == "complexity+energy+level+global"
    assert method_name(rows_for(True)) == "complexity+energy+level+global+orientation"
    features = calibration["anomaly.energy.mean"].numel()
    assert calibration["anomaly.energy.precision"].shape == (features, features)


def test_calibration_cross_fits(model: Glow) -> None:
    """Parameters from the first half alone, z-scores and the reference from the second half alone."""
    images = squares(400, seed=1)
    calibration = calibrate(model, images)
    changed = images.clone()
    changed[200:] = squares(200, seed=21)  # another second half: same parameters, other z-scores and reference
    other = calibrate(model, changed)
    # the same first half, up to the forward pass's batch-composition rounding (README: ~1e-5 relative)
    assert torch.allclose(calibration["anomaly.energy.mean"], other["anomaly.energy.mean"], rtol=1e-4, atol=1e-6)
    assert torch.allclose(calibration["anomaly.global.coef"], other["anomaly.global.coef"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(calibration["anomaly.energy.z"], other["anomaly.energy.z"], rtol=1e-2)
    assert not torch.allclose(calibration[REFERENCE_KEY], other[REFERENCE_KEY], rtol=1e-2)
    half = features(model, images[200:])
    energy = DETECTORS[1].feature(half, {"mean": calibration["anomaly.energy.mean"],
                                         "precision": calibration["anomaly.energy.precision"]})
    torch.testing.assert_close(calibration["anomaly.energy.z"], torch.stack([energy.mean(), energy.std()]))


def test_the_folded_form_gives_the_same_scores(model: Glow, calibration: dict[str, torch.Tensor]) -> None:
    x = torch.cat([squares(8, seed=2), synthetic_tensor("uniform", 8)])
    plain = AnomalyScorer(model, calibration).score(x)
    folded = AnomalyScorer(model, calibration, inference=model.fold(channels_last=True)).score(x)
    torch.testing.assert_close(folded.log_likelihood, plain.log_likelihood, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(folded.anomaly_score, plain.anomaly_score, rtol=1e-4, atol=1e-4)
    assert torch.equal(folded.is_anomaly, plain.is_anomaly)


def test_scores_are_deterministic_and_batch_invariant(model: Glow, calibration: dict[str, torch.Tensor]) -> None:
    scorer = AnomalyScorer(model, calibration)
    x = torch.cat([squares(8, seed=2), synthetic_tensor("uniform", 8)])
    together = scorer.score(x)
    again = scorer.score(x)
    assert torch.equal(together.anomaly_score, again.anomaly_score)
    for i in range(len(x)):
        alone = scorer.score(x[i : i + 1])
        # z-score units: float32 batch-size effects move scores by ~1e-5, thresholds are ~1
        torch.testing.assert_close(alone.anomaly_score, together.anomaly_score[i : i + 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone.log_likelihood, together.log_likelihood[i : i + 1], rtol=1e-5, atol=0)


def synthetic_tensor(name: str, n: int) -> torch.Tensor:
    return torch.from_numpy(synthetic_set(name, squares(n, seed=9).numpy(), n, seed=3))


@pytest.mark.parametrize("name", ["uniform", "gaussian"])
def test_obviously_different_images_separate(model: Glow, calibration: dict[str, torch.Tensor], name: str) -> None:
    scorer = AnomalyScorer(model, calibration, fpr=0.05)
    inside = scorer.score(squares(200, seed=4))
    outside = scorer.score(synthetic_tensor(name, 200))
    assert detection(inside.anomaly_score.numpy(), outside.anomaly_score.numpy()).auroc > 0.95
    assert outside.is_anomaly.double().mean() > 0.9
    assert inside.is_anomaly.double().mean() < 0.15


def test_calibration_round_trips_through_a_checkpoint(model: Glow, calibration: dict[str, torch.Tensor],
                                                      tmp_path: Path) -> None:
    save_checkpoint(model, tmp_path, {"name": "t", "dataset": {"name": "squares"}, "metrics": {}}, calibration)
    loaded = load_checkpoint(tmp_path)
    x = squares(16, seed=5)
    before = AnomalyScorer(model, calibration).score(x)
    after = AnomalyScorer(loaded.model, loaded.calibration).score(x)
    assert torch.equal(before.anomaly_score, after.anomaly_score)
    assert torch.equal(before.percentile, after.percentile)


def test_percentile_and_threshold_follow_the_reference(model: Glow, calibration: dict[str, torch.Tensor]) -> None:
    reference = torch.arange(100, dtype=torch.float64)
    scorer = AnomalyScorer(model, {**calibration, REFERENCE_KEY: reference}, fpr=0.05)
    assert scorer.percentile(torch.tensor([-1.0, 0.0, 10.0, 10.5, 1000.0])).tolist() == [0.0, 0.0, 10.0, 11.0, 100.0]
    assert scorer.threshold == 95.0
    assert (reference > scorer.threshold).double().mean().item() == pytest.approx(0.04)
    with pytest.raises(ValueError, match="false-positive rate"):
        AnomalyScorer(model, calibration, fpr=0.0)
    with pytest.raises(ValueError, match="lacks"):
        AnomalyScorer(model, {REFERENCE_KEY: reference})


def test_images_the_model_cannot_score_get_the_floor_the_cap_and_the_flag(
        model: Glow, calibration: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    x = squares(4, seed=6)
    original = Glow.log_prob_and_levels

    def overflowing(self: Glow, images: torch.Tensor, noise: torch.Tensor | None = None):
        """float32 overflows on image 1 (its latents) and image 3 (its log-likelihood, NaN)."""
        log_prob, latents, levels = original(self, images, noise)
        latents[0][1] = float("inf")
        log_prob[1], log_prob[3] = -float("inf"), float("nan")
        return log_prob, latents, levels

    expected = AnomalyScorer(model, calibration).score(x)
    monkeypatch.setattr(Glow, "log_prob_and_levels", overflowing)
    for orientation in (False, True):
        scores = AnomalyScorer(model, calibration, orientation=orientation).score(x)
        for values in (scores.log_likelihood, scores.bits_per_dim, scores.anomaly_score, scores.percentile):
            assert torch.isfinite(values).all()
        assert scores.log_likelihood[[1, 3]].tolist() == [LOG_LIKELIHOOD_FLOOR] * 2
        assert scores.anomaly_score[[1, 3]].tolist() == [SCORE_CAP] * 2 and scores.is_anomaly[[1, 3]].all()
        assert scores.percentile[[1, 3]].tolist() == [100.0, 100.0]
        assert (scores.anomaly_score[[0, 2]] < SCORE_CAP).all()
        if not orientation:  # the others are scored as without the overflowing ones
            torch.testing.assert_close(scores.anomaly_score[[0, 2]], expected.anomaly_score[[0, 2]])


def test_the_top_level_detector_is_fitted_and_used(model: Glow, calibration: dict[str, torch.Tensor]) -> None:
    coef = calibration["anomaly.global.coef"]
    assert coef.shape == (model.config.levels,)  # a slope per lower level, and an intercept
    x = torch.cat([squares(4, seed=9), synthetic_tensor("uniform", 4)])
    scorer = AnomalyScorer(model, calibration)
    f = scorer.features(x)
    assert f.level_nats.shape == (8, model.config.levels)
    # the levels' nats and log-dets add up to the image's: sum(nats) = -log p less the prior's constants
    d = model.config.dims
    constants = 0.5 * d * math.log(2 * math.pi) + d * model.config.n_bits * math.log(2)
    torch.testing.assert_close(f.level_nats.sum(1), -f.log_likelihood - constants, rtol=1e-5, atol=1e-2)
    # predicting the top level's nats 1 nat higher lowers each score by GLOBAL.weight / std of that detector
    shifted = {**calibration, "anomaly.global.coef": coef + torch.tensor([0.0] * (len(coef) - 1) + [1.0])}
    plain = x[:4]  # the noise images' scores may sit at SCORE_CAP, which no shift moves
    delta = scorer.score(plain).anomaly_score - AnomalyScorer(model, shifted).score(plain).anomaly_score
    mean, std = calibration["anomaly.global.z"].tolist()
    z = (GLOBAL.feature(f, {"coef": coef})[:4] - mean) / std
    # one-sided: the term is weight * max(z, 0), so predicting 1 nat more lowers it by weight / std, down to 0
    expected = GLOBAL.weight * (z.clamp(min=0) - (z - 1 / std).clamp(min=0))
    torch.testing.assert_close(delta, expected)
    assert (delta > 0).any()


def test_compressed_length_is_higher_for_noise_than_for_flat_images() -> None:
    flat = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    noise = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert (compressed_bits_per_dim(noise) > compressed_bits_per_dim(flat) + 4).all()
    rgb = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    assert compressed_bits_per_dim(rgb).shape == (1,)


def test_evaluation_command_prints_a_table_for_every_set(model: Glow, calibration: dict[str, torch.Tensor],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_checkpoint(model, tmp_path / "ckpt", {"name": "t", "dataset": {"name": "squares"}, "metrics": {}}, calibration)
    np.savez(tmp_path / "in.npz", images=squares(64, seed=7).numpy()[:, 0])
    np.savez(tmp_path / "out.npz", images=synthetic_tensor("uniform", 32).numpy()[:, 0])
    _, height, width = model.config.image_shape[0], *model.config.image_shape[1:]
    larger_rgb = np.random.default_rng(0).integers(0, 256, (16, height + 5, width + 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=larger_rgb)  # converted to grey and resized to the model's size
    code = evaluate_main(["--weights", str(tmp_path / "ckpt"), "--in-dist", str(tmp_path / "in.npz"),
                          "--ood", f"noise={tmp_path / 'out.npz'}", "--ood", f"rgb={tmp_path / 'rgb.npz'}",
                          "--synthetic", "constant", "flipped", "--synthetic-count", "32", "--fpr", "0.05"])
    assert code == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) == {"OOD set", "noise", "rgb", "constant", "flipped"}
    assert int(rows["rgb"][0]) == 16
    for name in ("noise", "rgb", "constant", "flipped"):
        values = [float(v.strip().rstrip("%")) for v in rows[name]]
        assert all(0 <= v <= 100 for v in values), (name, values)
    assert float(rows["noise"][4]) > 0.95  # anomaly-score AUROC for noise
    assert evaluate_main(["--weights", str(tmp_path / "nowhere"), "--in-dist", str(tmp_path / "in.npz")]) == 2


def test_the_orientation_detector_compares_each_image_with_itself_upside_down(
        model: Glow, calibration: dict[str, torch.Tensor]) -> None:
    plain = AnomalyScorer(model, calibration)
    oriented = AnomalyScorer(model, calibration, orientation=True)
    assert oriented.method == method_name(rows_for(True)) != plain.method
    x = torch.cat([squares(4, seed=10), synthetic_tensor("uniform", 4)])
    x[:4, :, :2] = 255  # a bar along the top: the squares' flips have it at the bottom, so the two differ
    f = oriented.features(x)
    flipped = oriented.features(x.flip(-2))
    # each image's upside-down likelihood is its flip's likelihood, computed in the same batch
    torch.testing.assert_close(f.upside_down_log_likelihood, flipped.log_likelihood, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(f.log_likelihood, plain.features(x).log_likelihood, rtol=1e-5, atol=1e-3)
    # the score is the plain one plus the weighted z-score of (nats of x) - (nats of x upside down), clamped at 0
    mean, std = calibration["anomaly.orientation.z"].tolist()
    z = ((f.upside_down_log_likelihood - f.log_likelihood) - mean) / std
    assert (z > 0).any() and (z < 0).any()  # both sides of the clamp are exercised
    expected = plain.score(x).anomaly_score + ORIENTATION.weight * z.clamp(min=0)
    torch.testing.assert_close(oriented.score(x).anomaly_score, expected.clamp(max=1e6), rtol=1e-4, atol=1e-3)
    # percentiles and the threshold come from its own reference (the plain one plus the clamped term)
    assert torch.equal(oriented.reference, torch.sort(calibration[ORIENTED_REFERENCE_KEY].double()).values)
    assert (calibration[ORIENTED_REFERENCE_KEY] >= calibration[REFERENCE_KEY] - 1e-9).all()
    assert (calibration[ORIENTED_REFERENCE_KEY] > calibration[REFERENCE_KEY]).any()
    # ... and batch invariance holds with the second pass
    alone = torch.cat([oriented.score(x[i : i + 1]).anomaly_score for i in range(len(x))])
    torch.testing.assert_close(alone, oriented.score(x).anomaly_score, rtol=1e-4, atol=1e-4)


def test_a_calibration_without_the_orientation_row_serves_the_default_rows_only(
        model: Glow, calibration: dict[str, torch.Tensor]) -> None:
    older = {k: v for k, v in calibration.items() if not k.startswith("anomaly.orientation.") and k != ORIENTED_REFERENCE_KEY}
    AnomalyScorer(model, older)  # a calibration without the optional row serves the default rows
    with pytest.raises(ValueError, match=r"lacks the rows \['orientation'\] \(python -m model.calibrate fits them\)"):
        AnomalyScorer(model, older, orientation=True)
    with pytest.raises(ValueError, match="anomaly.orientation.z must hold a finite mean and a positive standard"):
        AnomalyScorer(model, {**calibration, "anomaly.orientation.z": torch.tensor([1.0, 0.0])}, orientation=True)
    with pytest.raises(ValueError, match="anomaly.energy.z"):
        AnomalyScorer(model, {**calibration, "anomaly.energy.z": torch.full((2,), float("nan"))})
    with pytest.raises(ValueError, match="anomaly.global: fitted for another weight or sidedness"):
        AnomalyScorer(model, {**calibration, "anomaly.global.row": torch.tensor([1.0, 0.0])})


def test_the_orientation_detector_flags_images_the_wrong_way_up(model: Glow) -> None:
    """Squares with a bar along their top edge: upside down, the bar is at the bottom."""
    def barred(n: int, seed: int) -> torch.Tensor:
        images = squares(n, seed)
        images[:, :, 0, :] = 200
        return images

    glow = copy.deepcopy(model).train()
    fit(glow, barred(512, seed=11), seed=1)
    glow.eval()
    calibration = calibrate(glow, barred(400, seed=12))
    inside = barred(200, seed=13)
    oriented = AnomalyScorer(glow, calibration, orientation=True)

    def orientation_nats(images: torch.Tensor) -> np.ndarray:
        f = oriented.features(images)
        return (f.upside_down_log_likelihood - f.log_likelihood).numpy()

    # the detector alone tells them apart (the bar costs more at the bottom), and so does the score with it
    assert detection(orientation_nats(inside), orientation_nats(inside.flip(-2))).auroc > 0.95
    scores = [oriented.score(images).anomaly_score.numpy() for images in (inside, inside.flip(-2))]
    assert detection(*scores).auroc > 0.95


def test_the_transformed_synthetic_sets_are_the_images_turned() -> None:
    reference = squares(3, seed=14).numpy()
    assert np.array_equal(synthetic_set("flipped", reference, 3), reference[:, :, ::-1])
    assert np.array_equal(synthetic_set("mirrored", reference, 3), reference[:, :, :, ::-1])
    rotated = synthetic_set("rotated", reference, 2)
    assert rotated.shape == (2, 1, 8, 8) and np.array_equal(rotated[0, 0], np.rot90(reference[0, 0]))
    with pytest.raises(ValueError, match="square"):
        synthetic_set("rotated", np.zeros((2, 1, 8, 6), dtype=np.uint8), 2)


def test_the_held_out_synthetic_sets_are_what_they_say() -> None:
    reference = np.random.default_rng(0).integers(0, 256, (4, 1, 12, 12), dtype=np.uint8)
    assert np.array_equal(synthetic_set("inverted", reference, 4), 255 - reference)
    binary = synthetic_set("binary", reference, 50)
    assert set(np.unique(binary)) == {0, 255} and binary.shape == (50, 1, 12, 12)
    for name in ("blobs", "stripes"):
        images = synthetic_set(name, reference, 50).astype(np.int16)
        assert images.shape == (50, 1, 12, 12) and images.std() > 20  # not flat
        # smooth: neighbouring pixels differ far less than in uniform noise (~85 grey levels on average)
        assert np.abs(np.diff(images, axis=-1)).mean() < 60, name
    assert np.array_equal(synthetic_set("stripes", reference, 3, seed=1), synthetic_set("stripes", reference, 3, seed=1))


def test_a_class_prior_at_n_0_i_scores_as_the_unconditional_model(model: Glow,
                                                                    calibration: dict[str, torch.Tensor]) -> None:
    """The top level's nats of a conditional model come from its class mixture: at zero-initialised classes that
    is N(0, I), a constant away from the unconditional 0.5 |eps|^2, so every score is the same."""
    conditional = Glow(dataclasses.replace(CONFIG, labels=("a", "b")))
    missing, _ = conditional.load_state_dict(model.state_dict(), strict=False)
    assert all(name.startswith("class_prior.") for name in missing)
    conditional.eval()
    plain = AnomalyScorer(model, calibration).score(squares(40, seed=5))
    given = AnomalyScorer(conditional, calibrate(conditional, squares(400, seed=1))).score(squares(40, seed=5))
    assert torch.allclose(given.anomaly_score, plain.anomaly_score, rtol=1e-4, atol=1e-4)
