"""BatchMultiCrop pinned to its definitions: crop boxes, resampling, photometric ranges, independence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from sopvit.data import BatchMultiCrop, MultiCropSpec

FMNIST = {"global_size": 28, "local_size": 14, "n_locals": 2, "in_chans": 1, "blur_sigma": (0.1, 1.0)}
PLAIN = {
    "global_scale": (1.0, 1.0),
    "flip_prob": 0.0,
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "blur_probs": (0.0, 0.0, 0.0),
    "solarize_prob": 0.0,
}
# RGB -> YIQ, the chroma plane that hue jitter rotates
YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int, c: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=_seeded(seed))


def _raw(crop: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """Undo the normalisation: pixels in [0, 1]."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.stats)
    return crop * std + mean


def _reference_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """torchvision's RandomResizedCrop proposal: 10 tries of (area fraction ~ U(scale), log aspect ~
    U(log 3/4, log 4/3)), the first that fits, else the whole image; the offset uniform over what is left."""
    u = torch.rand(n, 10, 4, generator=gen, dtype=torch.float64)
    rows = []
    for i in range(n):
        w, h, t = float(width), float(height), 0
        for t in range(10):
            area = height * width * (scale[0] + float(u[i, t, 0]) * (scale[1] - scale[0]))
            ratio = math.exp(math.log(3 / 4) + float(u[i, t, 1]) * (math.log(4 / 3) - math.log(3 / 4)))
            cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if cw <= width and ch <= height:
                w, h = cw, ch
                break
        else:
            t = 0
        x1, y1 = float(u[i, t, 2]) * (width - w), float(u[i, t, 3]) * (height - h)
        rows.append([i, x1, y1, x1 + w, y1 + h])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.9, 1.0)])
def test_crop_boxes_follow_random_resized_crop(scale: tuple[float, float]) -> None:
    multicrop = BatchMultiCrop(MultiCropSpec(**FMNIST))
    boxes = multicrop._boxes(200, 20, 30, scale, _seeded(1), torch.device("cpu"))
    torch.testing.assert_close(boxes, _reference_boxes(200, 20, 30, scale, _seeded(1)), rtol=0, atol=1e-9)
    assert boxes[:, 1].min() >= 0 and boxes[:, 2].min() >= 0
    assert boxes[:, 3].max() <= 30 + 1e-9 and boxes[:, 4].max() <= 20 + 1e-9


def test_shrunk_crops_are_area_averaged_and_the_sampling_ratio_is_used() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "global_size": 7})
    x = _images(4, 1)
    expected = F.avg_pool2d(x.float() / 255, 4)  # 28 -> 7: the mean of each 4 x 4 block
    crop = BatchMultiCrop(spec)(x, _seeded(0))[0]
    torch.testing.assert_close(_raw(crop, spec), expected, atol=1e-5, rtol=0)
    three = BatchMultiCrop(spec, sampling_ratio=3)(x, _seeded(0))[0]
    one = BatchMultiCrop(spec, sampling_ratio=1)(x, _seeded(0))[0]
    assert not torch.allclose(three, crop, atol=1e-3) and not torch.allclose(one, crop, atol=1e-3)


def test_local_crops_are_never_solarized() -> None:
    spec = MultiCropSpec(
        **{**FMNIST, **PLAIN, "solarize_prob": 1.0, "local_scale": (1.0, 1.0), "local_size": 28}
    )
    x = _images(4, 1)
    crops = BatchMultiCrop(spec)(x, _seeded(0))
    for local in crops[2:]:
        torch.testing.assert_close(_raw(local, spec), x.float() / 255, atol=1e-5, rtol=0)


def test_solarize_threshold_is_128_of_255() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "solarize_prob": 1.0})
    x = torch.tensor([0.501, 0.503]).repeat_interleave(28 * 14).view(1, 1, 28, 28)
    raw = _raw(BatchMultiCrop(spec)(x, _seeded(0))[1], spec)
    assert raw.min().item() == pytest.approx(0.497, abs=1e-5)  # 0.503 >= 128/255: inverted
    assert raw.max().item() == pytest.approx(0.501, abs=1e-5)  # 0.501 < 128/255: kept


def test_brightness_factor_is_uniform_around_one() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0)})
    x = torch.full((2000, 1, 28, 28), 0.5)
    factor = _raw(BatchMultiCrop(spec)(x, _seeded(0))[0], spec).mean(dim=(1, 2, 3)) / 0.5
    assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4
    assert factor.min() < 0.62 and factor.max() > 1.38
    assert abs(factor.mean().item() - 1.0) < 0.02


def test_jitter_is_applied_with_its_probability() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 0.5, "jitter": (0.4, 0.0, 0.0, 0.0)})
    x = torch.full((2000, 1, 28, 28), 0.5)
    raw = _raw(BatchMultiCrop(spec)(x, _seeded(1))[0], spec).mean(dim=(1, 2, 3))
    unchanged = ((raw - 0.5).abs() < 1e-6).float().mean().item()
    assert 0.45 < unchanged < 0.55


def test_strong_brightness_stays_within_the_pixel_range() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 1.0, "jitter": (1.5, 0.0, 0.0, 0.0)})
    raw = _raw(BatchMultiCrop(spec)(torch.full((400, 1, 28, 28), 0.8), _seeded(0))[0], spec)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert (raw.amax(dim=(1, 2, 3)) < 1e-5).any() and (raw.amin(dim=(1, 2, 3)) > 1 - 1e-5).any()


def _yiq(rgb: torch.Tensor) -> torch.Tensor:
    return YIQ @ rgb


def test_hue_jitter_rotates_the_chroma_by_at_most_hue_turns() -> None:
    hue = 0.1
    spec = MultiCropSpec(
        **{**FMNIST, **PLAIN, "in_chans": 3, "jitter_prob": 1.0, "jitter": (0.0, 0.0, 0.0, hue)}
    )
    colour = torch.tensor([0.5, 0.4, 0.45])
    x = colour.view(1, 3, 1, 1).expand(500, 3, 28, 28).contiguous()
    out = _raw(BatchMultiCrop(spec)(x, _seeded(0))[0], spec)[:, :, 14, 14]
    before = _yiq(colour)
    after = torch.stack([_yiq(c) for c in out])
    torch.testing.assert_close(after[:, 0], before[0].expand(500), atol=1e-5, rtol=0)  # luma kept
    chroma = after[:, 1:].norm(dim=1)
    torch.testing.assert_close(chroma, before[1:].norm().expand(500), atol=1e-5, rtol=0)
    turn = torch.atan2(after[:, 2], after[:, 1]) - torch.atan2(before[2], before[1])
    turn = (turn + math.pi) % (2 * math.pi) - math.pi
    bound = 2 * math.pi * hue
    assert turn.abs().max() <= bound + 1e-4
    assert turn.max() > 0.9 * bound and turn.min() < -0.9 * bound
    assert abs(turn.mean().item()) < 0.1 * bound


@pytest.mark.parametrize("jitter", [(0.0, 0.4, 0.0, 0.0), (0.0, 0.0, 0.4, 0.0)])  # contrast, saturation
def test_contrast_and_saturation_jitter_change_colour_images(jitter: tuple[float, ...]) -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "in_chans": 3, "jitter_prob": 1.0, "jitter": jitter})
    x = _images(16, 3)
    raw = _raw(BatchMultiCrop(spec)(x, _seeded(0))[0], spec)
    changed = (raw - x.float() / 255).abs().amax(dim=(1, 2, 3)) > 0.01
    assert changed.float().mean() > 0.8


def test_each_image_is_augmented_independently_of_the_rest_of_the_batch() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    a = _images(8, 3, seed=0)
    b = torch.cat([a[:1], _images(7, 3, seed=1)])
    for crop_a, crop_b in zip(BatchMultiCrop(spec)(a, _seeded(3)), BatchMultiCrop(spec)(b, _seeded(3))):
        torch.testing.assert_close(crop_a[0], crop_b[0], atol=1e-5, rtol=0)


def test_colour_ops_draw_only_from_the_given_generator() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    multicrop, x = BatchMultiCrop(spec), _images(16, 3)
    torch.manual_seed(1)
    a = multicrop(x, _seeded(5))
    torch.manual_seed(2)
    b = multicrop(x, _seeded(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_grayscale_output_uses_the_luma_weights() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN})
    x = _images(4, 3)
    expected = TF.rgb_to_grayscale(x.float() / 255)
    torch.testing.assert_close(
        _raw(BatchMultiCrop(spec)(x, _seeded(0))[0], spec), expected, atol=1e-5, rtol=0
    )


def _blurred_impulses(n: int, sigma: tuple[float, float]) -> torch.Tensor:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "blur_probs": (1.0, 0.0, 0.0), "blur_sigma": sigma})
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    return _raw(BatchMultiCrop(spec)(x, _seeded(0))[0], spec)[:, 0]


def test_blur_sigma_is_drawn_over_its_whole_range() -> None:
    out = _blurred_impulses(300, (0.5, 2.0))
    offsets = torch.arange(28.0) - 14
    profile = out.sum(dim=1)  # (n, 28) the horizontal kernel
    profile = profile / profile.sum(dim=1, keepdim=True)
    sigma = (profile * offsets**2).sum(dim=1).sqrt()
    assert sigma.min() > 0.4 and sigma.max() < 2.05
    assert sigma.min() < 0.65 and sigma.max() > 1.8


def test_a_batch_of_one_image_is_blurred_too() -> None:
    out = _blurred_impulses(1, (1.0, 1.0))
    assert out[0, 14, 14] < 0.5 and out[0, 14, 15] > 0.01
