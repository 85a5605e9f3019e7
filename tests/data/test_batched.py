"""Vectorised batch multi-crop and the in-memory batched loader."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sopvit.data import (
    BatchMultiCrop,
    MultiCropSpec,
)
from sopvit.data.transforms import blur_kernel_size

FMNIST = {"global_size": 28, "local_size": 14, "n_locals": 4, "in_chans": 1, "blur_sigma": (0.1, 1.0)}
# Everything random switched off, so a full-image crop must reproduce the normalised input.
PLAIN = {
    "global_scale": (1.0, 1.0),
    "flip_prob": 0.0,
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "blur_probs": (0.0, 0.0, 0.0),
    "solarize_prob": 0.0,
}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 16, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=_seeded(seed))


def _normalise(x: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.stats)
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize(("in_c", "out_c"), [(1, 1), (1, 3), (3, 3), (3, 1)])
def test_shapes_dtypes_and_range(in_c: int, out_c: int) -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": out_c})
    crops = BatchMultiCrop(spec)(_images(8, in_c), _seeded(0))
    assert [tuple(c.shape) for c in crops] == [(8, out_c, 28, 28)] * 2 + [(8, out_c, 14, 14)] * 4
    mean, std = spec.stats
    lo = min((0 - m) / s for m, s in zip(mean, std)) - 1e-4
    hi = max((1 - m) / s for m, s in zip(mean, std)) + 1e-4
    for crop in crops:
        assert crop.dtype == torch.float32
        assert lo <= float(crop.min()) and float(crop.max()) <= hi


def test_identity_when_augmentations_are_off() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN})
    x = _images(6)
    crops = BatchMultiCrop(spec)(x, _seeded(0))
    torch.testing.assert_close(crops[0], _normalise(x, spec), atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], _normalise(x, spec), atol=1e-5, rtol=0)


def test_flip_and_solarize() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "flip_prob": 1.0, "solarize_prob": 1.0})
    x = _images(4)
    crops = BatchMultiCrop(spec)(x, _seeded(0))
    flipped = x.flip(-1)
    torch.testing.assert_close(crops[0], _normalise(flipped, spec), atol=1e-5, rtol=0)
    solarized = torch.where(flipped >= 128, 255 - flipped, flipped)
    torch.testing.assert_close(crops[1], _normalise(solarized, spec), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [28, 96])  # banded-matmul and depthwise-convolution paths
def test_blur_matches_torchvision(size: int) -> None:
    sigma = 1.3
    blur = {"blur_probs": (1.0, 0.0, 0.0), "blur_sigma": (sigma, sigma)}
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, **blur, "global_size": size, "in_chans": 3})
    x = _images(3, 3, size)
    crops = BatchMultiCrop(spec)(x, _seeded(0))
    kernel = blur_kernel_size(sigma, size)
    expected = TF.gaussian_blur(x.float(), [kernel, kernel], [sigma, sigma])
    torch.testing.assert_close(crops[0], _normalise(expected, spec), atol=1e-4, rtol=0)
    torch.testing.assert_close(crops[1], _normalise(x, spec), atol=1e-5, rtol=0)


def test_per_sample_diversity() -> None:
    spec = MultiCropSpec(**FMNIST)
    x = _images(1).expand(32, -1, -1, -1)
    for crop in BatchMultiCrop(spec)(x, _seeded(0)):
        flat = crop.flatten(1)
        distinct = {tuple(row.tolist()) for row in flat}
        assert len(distinct) == 32


def test_jitter_varies_brightness_per_sample() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0)})
    x = torch.full((64, 1, 28, 28), 100, dtype=torch.uint8)
    means = BatchMultiCrop(spec)(x, _seeded(0))[0].mean(dim=(1, 2, 3))
    assert means.std() > 0.1


def test_rgb_colour_ops_keep_range() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    crops = BatchMultiCrop(spec)(_images(32, 3), _seeded(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in spec.stats)
    raw = crops[0] * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    gray = (raw[:, 0] - raw[:, 1]).abs().flatten(1).max(1).values < 1e-5
    assert 0 < int(gray.sum()) < 32


def test_determinism_and_float_input() -> None:
    spec = MultiCropSpec(**FMNIST)
    multicrop = BatchMultiCrop(spec)
    x = _images(16)
    a = multicrop(x, _seeded(5))
    b = multicrop(x, _seeded(5))
    c = multicrop(x, _seeded(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    f = multicrop(x.float() / 255, _seeded(5))
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, f))


def test_invalid_batches() -> None:
    multicrop = BatchMultiCrop(MultiCropSpec(**FMNIST))
    with pytest.raises(ValueError, match="shape"):
        multicrop(torch.zeros(4, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        multicrop(torch.zeros(4, 2, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        multicrop(torch.zeros(4, 1, 28, 28, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda() -> None:
    spec = MultiCropSpec(**FMNIST)
    crops = BatchMultiCrop(spec)(_images(8).cuda(), _seeded(0))
    assert all(c.is_cuda and c.shape[0] == 8 for c in crops)
    cpu = BatchMultiCrop(spec)(_images(8), _seeded(0))
    assert all(torch.allclose(g.cpu(), c, atol=1e-4) for g, c in zip(crops, cpu))
