"""Where tensors run and in which precision: one rule for training, evaluation and the benchmark."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first GPU if one is visible, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    Raises:
        ValueError: a CUDA device is asked for but none (or not that one) is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ValueError(f"device {name!r} asked for, but no CUDA device is visible: use cpu (or auto)")
        if device.index is not None and device.index >= visible:
            raise ValueError(f"device {name!r} asked for, but only {visible} CUDA device(s) are visible")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or by default on CUDA; None means float32 throughout."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager[object]:
    """The autocast context for ``precision`` on ``device`` (a no-op for float32)."""
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU, whose ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
