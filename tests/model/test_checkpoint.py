"""Checkpoints: bit-identical round trip, and a clear refusal of every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.glow import Glow, GlowConfig

CONFIG = GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1, hidden_channels=4)
META = {"name": "tiny", "dataset": {"name": "synthetic"}, "metrics": {"test_bits_per_dim": 5.0}}


def trained_like() -> Glow:
    torch.manual_seed(0)
    model = Glow(CONFIG)
    model.initialize(torch.randint(0, 256, (16, *CONFIG.image_shape), dtype=torch.uint8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Glow, Path]:
    model = trained_like()
    save_checkpoint(model, tmp_path / "ckpt", META, {"val_anomaly_score": torch.linspace(3, 4, 10, dtype=torch.float64)})
    return model, tmp_path / "ckpt"


def test_round_trip_is_bit_identical(saved: tuple[Glow, Path]) -> None:
    model, folder = saved
    for path in (folder, folder / "glow.safetensors"):
        loaded = load_checkpoint(path)
        assert loaded.model.config == CONFIG
        assert not loaded.model.training
        original, restored = model.state_dict(), loaded.model.state_dict()
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k], restored[k]) for k in original)
        x = torch.randint(0, 256, (4, *CONFIG.image_shape), dtype=torch.uint8)
        assert torch.equal(loaded.model.log_prob(x), model.log_prob(x))
        assert torch.equal(loaded.calibration["val_anomaly_score"], torch.linspace(3, 4, 10, dtype=torch.float64))
        assert loaded.meta["name"] == "tiny" and loaded.meta["metrics"]["test_bits_per_dim"] == 5.0
        assert loaded.meta["parameters"] == sum(p.numel() for p in model.parameters())
        assert loaded.meta["config"] == CONFIG.to_dict()


def test_missing_files_are_refused(saved: tuple[Glow, Path], tmp_path: Path) -> None:
    _, folder = saved
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_checkpoint(tmp_path / "nowhere")
    (folder / "glow.json").unlink()
    with pytest.raises(CheckpointError, match="sidecar not found"):
        load_checkpoint(folder)


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda text: "[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
    (lambda text: text.replace('"levels": 2', '"levels": 2' + "0" * 5000, 1), "integer string conversion"),
    (lambda text: text.replace('"test_bits_per_dim": 5.0', '"test_bits_per_dim": NaN', 1), "NaN is not a JSON number"),
    (lambda text: text.replace('"test_bits_per_dim": 5.0', '"test_bits_per_dim": -Infinity', 1),
     "-Infinity is not a JSON number"),
], ids=["deep", "5000-digit", "nan", "infinity"])  # fmt: skip
def test_a_hostile_sidecar_is_one_checkpoint_error(saved: tuple[Glow, Path], corrupt: Any, message: str) -> None:
    _, folder = saved
    sidecar = folder / "glow.json"
    text = sidecar.read_text()
    changed = corrupt(text)
    assert changed != text
    sidecar.write_text(changed)
    with pytest.raises(CheckpointError, match=f"unreadable checkpoint sidecar: .*{message}"):
        load_checkpoint(folder)


def test_tampered_weights_fail_the_sha_check(saved: tuple[Glow, Path]) -> None:
    _, folder = saved
    weights = folder / "glow.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sidecar"):
        load_checkpoint(folder)


def _rewrite_sha(folder: Path) -> None:
    import hashlib

    sidecar = json.loads((folder / "glow.json").read_text())
    sidecar["weights_sha256"] = hashlib.sha256((folder / "glow.safetensors").read_bytes()).hexdigest()
    (folder / "glow.json").write_text(json.dumps(sidecar))


def test_truncated_file_is_reported_as_corrupt(saved: tuple[Glow, Path]) -> None:
    _, folder = saved
    weights = folder / "glow.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _rewrite_sha(folder)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_checkpoint(folder)


def test_config_mismatch_is_refused(saved: tuple[Glow, Path]) -> None:
    _, folder = saved
    sidecar = json.loads((folder / "glow.json").read_text())
    sidecar["config"]["hidden_channels"] = 5
    (folder / "glow.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="does not match the sidecar"):
        load_checkpoint(folder)
    sidecar["config"]["levels"] = "two"
    (folder / "glow.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)


def _replace_tensor(folder: Path, name: str, value: torch.Tensor | None) -> None:
    from safetensors import safe_open

    weights = folder / "glow.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(weights), metadata=metadata)
    _rewrite_sha(folder)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("model.levels.0.prior.prior.logs", torch.zeros(1, 3, 1, 1), "has shape"),
        ("model.levels.0.prior.prior.logs", None, "missing"),
        ("model.levels.0.steps.0.actnorm.bias", torch.full((1, 4, 1, 1), float("nan")), "NaN or infinite"),
        ("model.levels.0.steps.0.actnorm.initialized", torch.tensor(False), "never initialised"),
        ("calibration.val_anomaly_score", torch.tensor([1.0, float("inf")]), "calibration"),
    ],
)
def test_inconsistent_tensors_are_refused(saved: tuple[Glow, Path], name: str, value: torch.Tensor | None,
                                          message: str) -> None:
    _, folder = saved
    _replace_tensor(folder, name, value)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_weights_files_are_safetensors_not_pickles(saved: tuple[Glow, Path]) -> None:
    _, folder = saved
    header_length = int.from_bytes((folder / "glow.safetensors").read_bytes()[:8], "little")
    header = json.loads((folder / "glow.safetensors").read_bytes()[8 : 8 + header_length])
    assert header["__metadata__"]["format"] == "glow-checkpoint/1"
    assert json.loads(header["__metadata__"]["config"]) == CONFIG.to_dict()
