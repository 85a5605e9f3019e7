"""One rule for devices and precision, shared by training, evaluation and the benchmark."""

import pytest
import torch

from sopvit.device import autocast, autocast_dtype, resolve_device


def test_auto_is_the_gpu_when_one_is_visible() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_one_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        resolve_device(name)


def test_unknown_device_names_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu9")


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [
        ("auto", "cpu", None),
        ("auto", "cuda", torch.bfloat16),
        ("fp32", "cuda", None),
        ("bf16", "cpu", torch.bfloat16),
    ],
)
def test_precision_rule(precision: str, device: str, expected: torch.dtype | None) -> None:
    assert autocast_dtype(precision, torch.device(device)) is expected


def test_autocast_follows_the_rule_on_the_cpu() -> None:
    x = torch.randn(4, 4)
    with autocast(torch.device("cpu")):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp16")
