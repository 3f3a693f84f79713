"""The checkpoints in weights/: they load, describe themselves, and score real test images as their cards say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.anomaly import LOG_LIKELIHOOD_FLOOR, SCORE_CAP, AnomalyScorer, method_name, rows_for
from model.checkpoint import load_checkpoint
from model.data import FASHION_MNIST_DIR, load_dataset, load_images
from model.evaluate import bits_per_dim, classification_accuracy
from model.inference import TracedGlow

ROOT = Path(__file__).resolve().parents[2]
TEST_IMAGES = {
    "fashion-mnist": FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz",
    "mnist": ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz",
    "photos": ROOT / "data" / "photos" / "test.npz",  # make photos-data writes it
}
SHIPPED = {  # checkpoint -> its data set
    "fashion-mnist": "fashion-mnist", "mnist": "mnist",
    "fashion-mnist-classes": "fashion-mnist", "mnist-classes": "mnist",  # class-conditional
    "photos": "photos",  # RGB, 32x32
}
SUBSET = 1000  # test images scored here, evenly strided (a set may be ordered by source); the sidecar's: all


def shipped(name: str) -> Path:
    folder = ROOT / "weights" / name
    if not (folder / "glow.safetensors").is_file():
        pytest.skip(f"{folder} is not in this checkout")
    return folder


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_checkpoint_loads_and_matches_its_sidecar(name: str) -> None:
    checkpoint = load_checkpoint(shipped(name))
    meta = checkpoint.meta
    assert checkpoint.model.config.to_dict() == meta["config"]
    assert meta["dataset"]["name"] == SHIPPED[name]
    assert checkpoint.model.conditional == name.endswith("-classes")
    assert meta["parameters"] == sum(p.numel() for p in checkpoint.model.parameters())
    assert (shipped(name) / "README.md").read_text().count(f"{meta['metrics']['test_bits_per_dim']:.4f}") >= 1
    samples = checkpoint.model.sample(8, temperature=0.7, seed=0)
    assert samples.shape == (8, *checkpoint.model.config.image_shape) and samples.dtype == torch.uint8
    assert samples.float().std() > 10, "samples at T=0.7 should not be blank"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_test_images_score_as_the_card_states(name: str) -> None:
    folder, data = shipped(name), TEST_IMAGES[SHIPPED[name]]
    if not data.is_file():
        pytest.skip(f"{data} is not installed")
    checkpoint = load_checkpoint(folder)
    metrics = checkpoint.meta["metrics"]
    images = load_images(data)
    stride = max(1, len(images) // SUBSET)
    images = images[::stride][:SUBSET]
    result = bits_per_dim(checkpoint.model, images, seed=metrics["dequantization_seed"])
    # a 1,000-image subset of the images the sidecar averaged: within a few hundredths
    assert result.bin_centre == pytest.approx(metrics["test_bits_per_dim_bin_centre"], abs=0.05)
    assert result.dequantized == pytest.approx(metrics["test_bits_per_dim"], abs=0.05)
    assert result.dequantized > result.bin_centre
    if checkpoint.model.conditional:  # and its class posterior's accuracy, as the card states
        labels = load_dataset(data).labels[::stride][:SUBSET]
        accuracy = classification_accuracy(checkpoint.model, images, labels)
        assert accuracy == pytest.approx(metrics["test_accuracy"], abs=0.05)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_folded_form_the_service_runs_matches_the_model(name: str) -> None:
    folder, data = shipped(name), TEST_IMAGES[SHIPPED[name]]
    if not data.is_file():
        pytest.skip(f"{data} is not installed")
    model = load_checkpoint(folder).model
    x = torch.from_numpy(load_images(data)[:64])
    with torch.inference_mode():
        reference = model.log_prob(x)
        for form in (model.fold(), TracedGlow(model.fold(channels_last=True))):
            deviation = ((form.log_prob(x) - reference).abs() / reference.abs()).max()
            assert float(deviation) < 1e-4, f"{type(form).__name__}: {float(deviation):.2e}"
            assert torch.equal(form.decode(form.encode(x)), x)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_calibration_serves_the_score_with_and_without_the_orientation_row(name: str) -> None:
    checkpoint = load_checkpoint(shipped(name))
    described = checkpoint.meta["anomaly"]
    assert [row["name"] for row in described["rows"]] == [row.name for row in rows_for(True)]
    for orientation in (False, True):
        scorer = AnomalyScorer(checkpoint.model, checkpoint.calibration, orientation=orientation)
        assert scorer.method == method_name(rows_for(orientation)) and scorer.method in described["methods"]
        assert scorer.reference.numel() == described["reference_size"]


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_a_one_pixel_checkerboard_follows_the_overflow_policy(name: str) -> None:
    """Fashion-MNIST's latents pass float32's range on it (floor, cap, flagged); MNIST's stay finite."""
    checkpoint = load_checkpoint(shipped(name))
    board = ((torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 255).to(torch.uint8)
    x = torch.stack([board[None], 255 - board[None], torch.zeros(1, 28, 28, dtype=torch.uint8)])
    for orientation in (False, True):
        scorer = AnomalyScorer(checkpoint.model, checkpoint.calibration, orientation=orientation)
        with torch.inference_mode():
            f = scorer.features(x)
            scores = scorer.score(x)
        assert bool(f.overflow[0]) == (name == "fashion-mnist") and not bool(f.overflow[2])  # measured per model
        overflowed = f.overflow.nonzero().flatten().tolist()
        assert scores.log_likelihood[overflowed].eq(LOG_LIKELIHOOD_FLOOR).all()
        assert scores.anomaly_score[overflowed].eq(SCORE_CAP).all() and scores.is_anomaly[overflowed].all()
        assert torch.isfinite(scores.log_likelihood).all() and torch.isfinite(scores.bits_per_dim).all()
