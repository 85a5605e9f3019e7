"""BatchMultiCrop: the batched (device) multi-crop's API, outputs and input validation."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sopvit.data import BatchMultiCrop, MultiCropSpec
from sopvit.data.counter_rng import image_keys
from sopvit.data.crop_params import CropParams, sample_crop_params
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


def _keys(n: int, seed: int = 0, epoch: int = 0, start: int = 0) -> torch.Tensor:
    return image_keys(seed, epoch, torch.arange(start, start + n))


def _images(b: int = 16, c: int = 1, size: int = 28, seed: int = 0, width: int | None = None) -> torch.Tensor:
    shape = (b, c, size, size if width is None else width)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalise(x: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.stats)
    return (x.float() / 255 - mean) / std


def _assert_same_params(a: list[CropParams], b: list[CropParams]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        for field in CropParams.__dataclass_fields__:
            assert torch.equal(getattr(p, field), getattr(q, field)), field


@pytest.mark.parametrize(("in_c", "out_c"), [(1, 1), (1, 3), (3, 3), (3, 1)])
def test_shapes_dtypes_and_range(in_c: int, out_c: int) -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": out_c})
    crops = BatchMultiCrop(spec)(_images(8, in_c), _keys(8))
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
    crops = BatchMultiCrop(spec)(x, _keys(6))
    torch.testing.assert_close(crops[0], _normalise(x, spec), atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], _normalise(x, spec), atol=1e-5, rtol=0)


def test_flip_and_solarize() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "flip_prob": 1.0, "solarize_prob": 1.0})
    x = _images(4)
    crops = BatchMultiCrop(spec)(x, _keys(4))
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
    crops = BatchMultiCrop(spec)(x, _keys(3))
    kernel = blur_kernel_size(sigma, size)
    expected = TF.gaussian_blur(x.float(), [kernel, kernel], [sigma, sigma])
    torch.testing.assert_close(crops[0], _normalise(expected, spec), atol=1e-4, rtol=0)
    torch.testing.assert_close(crops[1], _normalise(x, spec), atol=1e-5, rtol=0)


def test_per_sample_diversity() -> None:
    spec = MultiCropSpec(**FMNIST)
    x = _images(1).expand(32, -1, -1, -1)
    for crop in BatchMultiCrop(spec)(x, _keys(32)):
        distinct = {tuple(row.tolist()) for row in crop.flatten(1)}
        assert len(distinct) == 32


def test_jitter_varies_brightness_per_sample() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0)})
    x = torch.full((64, 1, 28, 28), 100, dtype=torch.uint8)
    means = BatchMultiCrop(spec)(x, _keys(64))[0].mean(dim=(1, 2, 3))
    assert means.std() > 0.1


def test_rgb_colour_ops_keep_range() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    crops = BatchMultiCrop(spec)(_images(32, 3), _keys(32, seed=1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in spec.stats)
    raw = crops[0] * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    gray = (raw[:, 0] - raw[:, 1]).abs().flatten(1).max(1).values < 1e-5
    assert 0 < int(gray.sum()) < 32


def test_determinism_and_float_input() -> None:
    spec = MultiCropSpec(**FMNIST)
    multicrop = BatchMultiCrop(spec)
    x = _images(16)
    a = multicrop(x, _keys(16, seed=5))
    b = multicrop(x, _keys(16, seed=5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    for other in (_keys(16, seed=6), _keys(16, seed=5, epoch=1), _keys(16, seed=5, start=16)):
        c = multicrop(x, other)
        assert all(not torch.equal(u, v) for u, v in zip(a, c))
    f = multicrop(x.float() / 255, _keys(16, seed=5))
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, f))
    f64 = multicrop(x.double() / 255, _keys(16, seed=5))
    assert all(v.dtype == torch.float32 and torch.allclose(u, v, atol=1e-5) for u, v in zip(a, f64))


def test_params_are_the_crop_params_of_the_keys_and_sizes() -> None:
    spec = MultiCropSpec(**FMNIST)
    x, keys = _images(8, size=40, width=30), _keys(8, seed=3)
    expected = sample_crop_params(spec, keys, torch.full((8,), 40), torch.full((8,), 30))
    _assert_same_params(BatchMultiCrop(spec).params(x, keys), expected)
    _assert_same_params(BatchMultiCrop(spec).params(list(x), keys), expected)


def test_invalid_batches() -> None:
    multicrop = BatchMultiCrop(MultiCropSpec(**FMNIST))
    keys = _keys(4)
    with pytest.raises(ValueError, match="shape"):
        multicrop(torch.zeros(4, 28, 28, dtype=torch.uint8), keys)
    with pytest.raises(ValueError, match="channels"):
        multicrop(torch.zeros(4, 2, 28, 28, dtype=torch.uint8), keys)
    with pytest.raises(TypeError, match="uint8 or floating"):
        multicrop(torch.zeros(4, 1, 28, 28, dtype=torch.int64), keys)
    with pytest.raises(ValueError, match="keys"):
        multicrop(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), _keys(3))
    with pytest.raises(ValueError, match="keys must be int64"):
        multicrop(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), keys.to(torch.int32))
    with pytest.raises(ValueError, match="keys must be int64"):
        multicrop(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), keys.view(2, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        multicrop([torch.zeros(1, 1, 28, 28, dtype=torch.uint8)] * 4, keys)
    with pytest.raises(ValueError, match="sampling_ratio"):
        BatchMultiCrop(MultiCropSpec(**FMNIST), sampling_ratio=-1)


@pytest.mark.parametrize(
    ("in_c", "out_c"),
    [
        (1, 1),
        (3, 3),
        (3, 1),
    ],
)
def test_a_list_of_same_size_images_equals_the_tensor_path(in_c: int, out_c: int) -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": out_c})
    x, keys = _images(6, in_c, size=40, width=36, seed=2), _keys(6, seed=1)
    multicrop = BatchMultiCrop(spec)
    for a, b in zip(multicrop(x, keys), multicrop(list(x), keys), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_a_list_of_gray_images_for_rgb_output_is_close_to_the_tensor_path() -> None:
    # The list path widens gray images to 3 channels (to batch them with RGB ones); the tensor path keeps
    # one channel and skips saturation and grayscale, which on a 3-channel gray image blend with luma
    # weights summing to 0.9999: the two differ by up to 1e-4 of a pixel, 4.4e-4 after normalisation.
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    x, keys = _images(6, 1, size=40, seed=2), _keys(6, seed=1)
    multicrop = BatchMultiCrop(spec)
    for a, b in zip(multicrop(x, keys), multicrop(list(x), keys), strict=True):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0)


def test_images_of_different_sizes_in_one_list() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3})
    sizes = [(28, 28), (40, 17), (13, 90), (200, 150), (28, 28)]
    images = [_images(1, 3 if i % 2 else 1, size=h, width=w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    keys = _keys(len(sizes), seed=4)
    multicrop = BatchMultiCrop(spec)
    crops = multicrop(images, keys)
    n = len(sizes)
    assert [tuple(c.shape) for c in crops] == [(n, 3, 28, 28)] * 2 + [(n, 3, 14, 14)] * 4
    assert all(torch.isfinite(c).all() for c in crops)
    heights, widths = (torch.tensor(v) for v in zip(*sizes))
    for p in multicrop.params(images, keys):
        top, left, h, w = p.boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= heights).all() and (left + w <= widths).all()
    # Each image's crops are those of a batch of that image alone (with its key).
    for i, image in enumerate(images):
        alone = multicrop([image], keys[i : i + 1])
        for crop, single in zip(crops, alone):
            torch.testing.assert_close(crop[i : i + 1], single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("as_list", [False, True])
def test_no_local_crops(as_list: bool) -> None:
    spec = MultiCropSpec(**{**FMNIST, "n_locals": 0})
    x = _images(3)
    crops = BatchMultiCrop(spec)(list(x) if as_list else x, _keys(3))
    assert [tuple(c.shape) for c in crops] == [(3, 1, 28, 28)] * 2


@pytest.mark.parametrize("as_list", [False, True])
def test_an_empty_batch_gives_empty_crops(as_list: bool) -> None:
    spec = MultiCropSpec(**FMNIST)
    x = torch.zeros(0, 1, 28, 28, dtype=torch.uint8)
    crops = BatchMultiCrop(spec)([] if as_list else x, _keys(0))
    assert [tuple(c.shape) for c in crops] == [(0, 1, 28, 28)] * 2 + [(0, 1, 14, 14)] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("as_list", [False, True])
def test_cuda_equals_cpu(as_list: bool) -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "global_size": 96, "local_size": 32})
    x, keys = _images(8, 3, size=120), _keys(8, seed=7)
    multicrop = BatchMultiCrop(spec)
    cpu_images = list(x) if as_list else x
    cuda_images = [im.cuda() for im in x] if as_list else x.cuda()
    _assert_same_params(multicrop.params(cuda_images, keys.cuda()), multicrop.params(cpu_images, keys))
    cuda = multicrop(cuda_images, keys.cuda())
    cpu = multicrop(cpu_images, keys)
    assert len(cuda) == len(cpu)
    for g, c in zip(cuda, cpu):
        assert g.is_cuda and g.shape == c.shape
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=0)
