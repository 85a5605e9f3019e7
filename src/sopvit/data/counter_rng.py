"""Counter-based random numbers: uniforms that are a pure function of (image key, stream, position).

The device path draws every random parameter of a batch at once, yet each image's augmentation must
depend only on (seed, epoch, image), as on the per-sample path: then a resumed run and each rank of a
distributed run see exactly the crops a single uninterrupted process would. A stateful generator per
image would cost a host call per image; SplitMix64 (Steele et al., 2014) over a counter gives the same
independence with a few integer tensor ops for the whole batch, on any device, bit-identical everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sopvit.data.seeding import mix_seed

__all__ = ["image_keys", "uniforms"]

_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's counter increment (2^64 / golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_STREAM = 0xD6E8FEB86659FD93  # separates the streams of one key


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors; multiplication wraps modulo 2^64 as in C."""
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def image_keys(seed: int, epoch: int, indices: Tensor) -> Tensor:
    """int64 ``(n,)`` keys of images ``indices`` (int ``(n,)``) in ``epoch`` of a run seeded ``seed``."""
    base = _signed(mix_seed(seed, epoch))
    return _mix(indices.to(torch.int64) * _signed(_GOLDEN) + base)


def uniforms(keys: Tensor, stream: int, count: int) -> Tensor:
    """float64 ``(n, count)`` uniforms in [0, 1) for int64 ``keys`` ``(n,)``, on the keys' device.

    Row i depends only on ``(keys[i], stream, count)``'s first entries: a longer ``count`` extends a
    row without changing its start. Distinct ``stream`` numbers give independent sequences.
    """
    if keys.dtype != torch.int64 or keys.ndim != 1:
        raise ValueError(f"keys must be an int64 tensor of shape (n,), got {keys.dtype} {tuple(keys.shape)}")
    if count < 0 or stream < 0:
        raise ValueError(f"stream and count must be >= 0, got {stream}, {count}")
    start = _mix(keys + _signed(_STREAM * (stream + 1)))
    steps = torch.arange(1, count + 1, device=keys.device, dtype=torch.int64) * _signed(_GOLDEN)
    bits = _shr(_mix(start[:, None] + steps), 11)  # the top 53 bits: every double in [0, 1) on a 2^-53 grid
    return bits.to(torch.float64) * 2.0**-53
