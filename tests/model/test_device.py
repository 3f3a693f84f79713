"""Device names: auto, cpu, cuda, cuda:N; TF32 off on CUDA for serving and evaluation."""

from __future__ import annotations

import pytest
import torch

from model.device import DeviceUnavailable, check_device_name, exact_float32, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_names(name: str) -> None:
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "CUDA", "mps", ""])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_cuda_device_this_machine_lacks_is_unavailable() -> None:
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:1"
    with pytest.raises(DeviceUnavailable, match=r"--device cuda"):
        resolve_device(missing)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_and_exact_float32() -> None:
    torch.backends.cudnn.allow_tf32 = True
    device = resolve_device("cuda:0")
    exact_float32(device)
    assert device == torch.device("cuda:0")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_exact_float32_leaves_the_cpu_alone() -> None:
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    exact_float32(torch.device("cpu"))
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before
