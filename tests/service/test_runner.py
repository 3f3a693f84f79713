"""The runner: the same numbers as the model itself, in one worker thread under inference mode."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_testing import SHAPE, random_pixels

from model.anomaly import LOG_LIKELIHOOD_FLOOR, AnomalyScorer, compressed_bits_per_dim, method_name, rows_for
from model.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from model.device import DeviceUnavailable, resolve_device
from model.glow import Glow
from model.inference import TracedGlow
from service.runner import ModelRunner, Scorable


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path) -> Iterator[ModelRunner]:
    loaded = ModelRunner(tiny_checkpoint, "cpu")
    loaded.load()
    yield loaded
    loaded.close()


def test_batches_run_through_the_checked_torchscript_form(runner: ModelRunner) -> None:
    assert runner.form == "torchscript" and isinstance(runner.inference, TracedGlow)


def test_torchscript_can_be_turned_off(tiny_checkpoint: Path) -> None:
    eager = ModelRunner(tiny_checkpoint, "cpu", torchscript=False)
    eager.load()
    assert eager.form == "eager" and type(eager.inference) is Glow


def test_graphs_that_disagree_are_not_served(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    class WrongGraphs(TracedGlow):
        def log_prob(self, x: torch.Tensor) -> torch.Tensor:
            return super().log_prob(x) * 1.001

    monkeypatch.setattr("service.runner.TracedGlow", WrongGraphs)
    fallback = ModelRunner(tiny_checkpoint, "cpu")
    fallback.load()
    assert fallback.form == "eager" and type(fallback.inference) is Glow
    assert "TorchScript form unusable (RuntimeError: log-likelihoods deviate" in caplog.text
    assert len(fallback.score_batch(fallback.scorable(random_pixels(2, 0)))) == 2


def test_auto_picks_cuda_when_present() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present on this machine")
def test_cuda_without_cuda_is_one_clear_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
        ModelRunner(tiny_checkpoint, "cuda").load()


def test_a_checkpoint_without_calibration_is_refused(tmp_path: Path, reference: Checkpoint) -> None:
    save_checkpoint(reference.model, tmp_path, {"name": "uncalibrated"})
    with pytest.raises(CheckpointError, match="unusable anomaly calibration: .*lacks"):
        ModelRunner(tmp_path, "cpu").load()


def test_the_orientation_detector_is_served_when_asked_for(tiny_checkpoint: Path, reference: Checkpoint) -> None:
    oriented = ModelRunner(tiny_checkpoint, "cpu", anomaly_orientation=True)
    oriented.load()
    expected = AnomalyScorer(reference.model, reference.calibration, orientation=True)
    assert oriented.scorer.method == method_name(rows_for(True)) and oriented.scorer.threshold == expected.threshold
    images = random_pixels(3, 1)
    got = [s.anomaly_score for s in oriented.score_batch(oriented.scorable(images))]
    want = expected.score(torch.from_numpy(np.stack(images))).anomaly_score.tolist()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    oriented.close()


def test_orientation_on_a_checkpoint_calibrated_without_it_is_refused(tmp_path: Path, reference: Checkpoint) -> None:
    older = {k: v for k, v in reference.calibration.items()
             if not k.startswith("anomaly.orientation.") and k != "anomaly.reference." + method_name(rows_for(True))}
    save_checkpoint(reference.model, tmp_path, {"name": "older"}, older)
    ModelRunner(tmp_path, "cpu").load()  # the plain score still serves
    with pytest.raises(CheckpointError, match="lacks the rows .*python -m model.calibrate fits them"):
        ModelRunner(tmp_path, "cpu", anomaly_orientation=True).load()


def test_scores_match_the_scorer(runner: ModelRunner, reference_scorer: AnomalyScorer) -> None:
    images = random_pixels(5, 0)
    expected = reference_scorer.score(torch.from_numpy(np.stack(images)))
    scores = runner.score_batch(runner.scorable(images))
    assert [s.log_likelihood for s in scores] == pytest.approx(expected.log_likelihood.tolist(), rel=1e-6)
    assert [s.percentile for s in scores] == expected.percentile.tolist()
    assert [s.is_anomaly for s in scores] == expected.is_anomaly.tolist()


def test_the_compression_is_measured_where_scorable_runs(runner: ModelRunner, reference_scorer: AnomalyScorer) -> None:
    images = random_pixels(3, 2)
    items = runner.scorable(images)
    expected = compressed_bits_per_dim(torch.from_numpy(np.stack(images))).tolist()
    assert [item.complexity for item in items] == expected and all(i.pixels is p for i, p in zip(items, images))
    assert runner.scorable([]) == []
    # the complexity given is the complexity used: a lower one raises the (one-sided) complexity row's term
    shifted = [Scorable(item.pixels, item.complexity - 1.0) for item in items]
    assert [s.log_likelihood for s in runner.score_batch(shifted)] == [
        s.log_likelihood for s in runner.score_batch(items)
    ]
    assert all(a.anomaly_score > b.anomaly_score
               for a, b in zip(runner.score_batch(shifted), runner.score_batch(items)))


def test_encode_decode_and_sample_match_the_model(runner: ModelRunner, reference: Checkpoint) -> None:
    images = random_pixels(3, 1)
    x = torch.from_numpy(np.stack(images))
    encoded = runner.encode_batch(images)
    assert np.allclose(np.stack([e.latent for e in encoded]), reference.model.encode(x).numpy(), atol=1e-5)
    decoded = runner.decode_batch([e.latent for e in encoded])
    assert np.array_equal(np.stack(decoded), images)
    samples = runner.decode_batch(list(runner.sample_noise(4, 0.7, seed=3)))
    assert np.array_equal(np.stack(samples), reference.model.sample(4, 0.7, seed=3).numpy())


async def test_calls_run_in_one_worker_thread_under_inference_mode(runner: ModelRunner) -> None:
    def where() -> tuple[str, bool]:
        return threading.current_thread().name, torch.is_inference_mode_enabled()

    name, inference = await runner.call(where)
    assert name.startswith("glow-model") and inference
    assert threading.current_thread().name != name


def test_warm_up_runs_batch_one_and_the_largest(tiny_checkpoint: Path) -> None:
    sizes: list[int] = []

    class Recording(ModelRunner):
        def score_batch(self, images: list[Scorable]) -> list:  # type: ignore[type-arg]
            sizes.append(len(images))
            return super().score_batch(images)

    recording = Recording(tiny_checkpoint, "cpu")
    recording.load()
    recording.warm_up(6)
    assert sizes == [1, 6]
    assert recording.image_shape == SHAPE and recording.latent_dim == 784 and recording.dtype == "float32"


def test_a_missing_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    missing = ModelRunner(tmp_path / "nowhere", "cpu")
    with pytest.raises(CheckpointError, match="not found"):
        missing.load()
    assert not missing.loaded


def test_encode_marks_images_whose_latents_overflow_and_floors_their_log_likelihood(
        runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    images = random_pixels(3, 2)
    form = runner.inference

    class Overflowing(TracedGlow):
        """float32 overflows on image 1 (its latents) and image 2 (its log-likelihood only)."""

        def __init__(self) -> None:  # the served form's graphs, as they are
            pass

        def encode_with_log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z, log_prob = form.encode_with_log_prob(x)
            z, log_prob = z.clone(), log_prob.clone()
            z[1, 5], log_prob[1], log_prob[2] = float("inf"), -float("inf"), float("nan")
            return z, log_prob

    monkeypatch.setattr(runner, "_inference", Overflowing())
    encoded = asyncio.run(runner.call(runner.encode_batch, images))  # in the worker thread, under inference mode
    assert encoded[0].latent is not None and np.isfinite(encoded[0].latent).all() and encoded[1].latent is None
    assert encoded[2].latent is not None
    assert [e.log_likelihood for e in encoded[1:]] == [LOG_LIKELIHOOD_FLOOR] * 2
    assert np.isfinite(encoded[0].log_likelihood) and encoded[0].log_likelihood > LOG_LIKELIHOOD_FLOOR


def test_the_plain_model_runs_under_inference_mode_and_after_it(reference: Checkpoint) -> None:
    model = copy.deepcopy(reference.model)
    x = torch.from_numpy(np.stack(random_pixels(2, 4)))
    with torch.inference_mode():
        expected = model.log_prob(x)
    loss = -model.log_prob(x).mean()  # with autograd on, after inference mode
    loss.backward()
    torch.testing.assert_close(-loss.detach(), expected.mean())
