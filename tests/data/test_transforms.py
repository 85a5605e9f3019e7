"""Per-sample multi-crop and evaluation transforms."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sopvit.data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropSpec, MultiCropTransform
from sopvit.data.transforms import blur_kernel_size, to_uint8_chw

SMALL = {"global_size": 32, "local_size": 16, "n_locals": 3}


def _rgb_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
    return Image.fromarray(arr.numpy(), "RGB")


def _check_crops(crops: list[torch.Tensor], chans: int, spec: MultiCropSpec) -> None:
    assert len(crops) == 2 + spec.n_locals
    for i, crop in enumerate(crops):
        size = spec.global_size if i < 2 else spec.local_size
        assert crop.shape == (chans, size, size)
        assert crop.dtype == torch.float32
        assert torch.isfinite(crop).all()
    mean, std = spec.stats
    lo = min((0 - m) / s for m, s in zip(mean, std)) - 1e-4
    hi = max((1 - m) / s for m, s in zip(mean, std)) + 1e-4
    assert all(lo <= float(c.min()) and float(c.max()) <= hi for c in crops)


def test_rgb_pil_input() -> None:
    spec = MultiCropSpec(**SMALL)
    _check_crops(MultiCropTransform(spec)(_rgb_image()), 3, spec)


def test_default_spec_imagenet_sizes() -> None:
    spec = MultiCropSpec(n_locals=2)
    crops = MultiCropTransform(spec)(_rgb_image(size=(120, 100)))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2
    assert spec.stats == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("source", ["pil_L", "pil_RGB", "pil_RGBA", "tensor_1", "tensor_3", "tensor_hw"])
def test_channel_handling(in_chans: int, source: str) -> None:
    spec = MultiCropSpec(**SMALL, in_chans=in_chans)
    rgb = _rgb_image(1)
    img: Image.Image | torch.Tensor
    if source.startswith("pil"):
        img = rgb.convert(source.split("_")[1])
    elif source == "tensor_hw":
        img = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    else:
        img = torch.randint(0, 256, (int(source[-1]), 28, 28), dtype=torch.uint8)
    _check_crops(MultiCropTransform(spec)(img), in_chans, spec)


def test_grayscale_input_to_rgb_has_equal_channels_until_normalised() -> None:
    spec = MultiCropSpec(**SMALL, in_chans=3)
    x = to_uint8_chw(torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8), 3)
    assert x.shape == (3, 20, 20) and torch.equal(x[0], x[2])
    crops = MultiCropTransform(spec)(x[:1])
    mean, std = torch.tensor(spec.stats[0]), torch.tensor(spec.stats[1])
    raw = crops[0] * std[:, None, None] + mean[:, None, None]
    # Hue/saturation jitter of a gray image leaves it gray.
    torch.testing.assert_close(raw[0], raw[1], atol=2 / 255, rtol=0)


def test_crops_are_random() -> None:
    transform = MultiCropTransform(MultiCropSpec(**SMALL))
    img = _rgb_image(2)
    torch.manual_seed(0)
    a = transform(img)
    b = transform(img)
    assert not torch.equal(a[0], b[0])
    assert not torch.equal(a[2], a[3])


def test_invalid_inputs() -> None:
    transform = MultiCropTransform(MultiCropSpec(**SMALL))
    with pytest.raises(TypeError, match="uint8"):
        transform(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="shape"):
        transform(torch.zeros(2, 20, 20, dtype=torch.uint8))
    with pytest.raises(TypeError, match="PIL"):
        transform([1, 2, 3])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_chans": 2},
        {"in_chans": 1, "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)},
        {"global_scale": (0.8, 0.2)},
        {"local_scale": (0.0, 0.5)},
        {"n_locals": -1},
        {"blur_probs": (1.0, 0.1)},
        {"solarize_prob": 1.5},
        {"std": (0.0, 1.0, 1.0)},
    ],
)
def test_spec_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MultiCropSpec(**kwargs)


def test_blur_kernel_size_fits_crop() -> None:
    assert blur_kernel_size(2.0, 224) == 13
    assert blur_kernel_size(2.0, 8) == 7
    assert blur_kernel_size(1.0, 14) == 7
    assert all(blur_kernel_size(2.0, s) % 2 == 1 for s in range(1, 40))


def test_eval_transform_is_deterministic_and_normalised() -> None:
    transform = EvalTransform(32)
    assert transform.resize == round(32 * 256 / 224)
    img = _rgb_image(3, size=(60, 50))
    out = transform(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transform(img))
    flat = Image.new("RGB", (40, 40), (255, 0, 128))
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(transform(flat)[:, 16, 16], expected.float(), atol=1e-3, rtol=0)


def test_eval_transform_grayscale() -> None:
    transform = EvalTransform(28, resize=28, mean=(0.5,), std=(0.5,), in_chans=1)
    x = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(transform(x), x.float() / 127.5 - 1.0)
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(32, resize=16)
    with pytest.raises(ValueError, match="in_chans"):
        EvalTransform(32, mean=(0.5,), std=(0.5,))
