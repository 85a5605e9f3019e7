"""BatchMultiCrop pinned to its definitions: crop boxes, resampling, photometric ops equal to torchvision's
with the drawn parameters, and each image's crops a function of its own key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from sopvit.data import BatchMultiCrop, MultiCropSpec
from sopvit.data.counter_rng import image_keys
from sopvit.data.crop_params import CropParams, sample_crop_params
from sopvit.data.photometric import apply_photometric
from sopvit.data.transforms import blur_kernel_size
from tests.data.test_batched import PLAIN

FMNIST = {"global_size": 28, "local_size": 14, "n_locals": 2, "in_chans": 1, "blur_sigma": (0.1, 1.0)}


def _keys(n: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    return image_keys(seed, 0, torch.arange(start, start + n))


def _images(b: int, c: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=gen)


def _raw(crop: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """Undo the normalisation: pixels in [0, 1]."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.stats)
    return crop * std + mean


# --- geometry -----------------------------------------------------------------------------------------


def test_crops_are_taken_at_the_boxes_params_reports() -> None:
    # Channel 0 ramps along x, channel 1 along y: bilinear sampling is exact on a linear ramp, so each
    # output pixel reads back where it was sampled: bin centre left + (j + 1/2) w / s - 1/2 (aligned=True).
    height, width = 100, 120
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "in_chans": 3, "global_scale": (0.32, 1.0)})
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([xs, ys, torch.zeros_like(xs)])
    x, keys = image.expand(16, -1, -1, -1), _keys(16, seed=2)
    multicrop = BatchMultiCrop(spec)
    params = multicrop.params(x, keys)
    for crop, p in zip(multicrop(x, keys), params, strict=True):
        size = crop.shape[-1]
        raw = _raw(crop, spec)[:, :, 1:-1, 1:-1]  # the borders' samples may be clamped to the image
        centres = torch.arange(1, size - 1, dtype=torch.float64) + 0.5
        top, left, h, w = p.boxes.double().unbind(1)
        at_x = (left[:, None] + centres * w[:, None] / size - 0.5) / (width - 1)  # (n, size - 2)
        at_y = (top[:, None] + centres * h[:, None] / size - 0.5) / (height - 1)
        inner = size - 2
        along_x, along_y = at_x[:, None].expand(-1, inner, -1), at_y[..., None].expand(-1, -1, inner)
        torch.testing.assert_close(raw[:, 0].double(), along_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(raw[:, 1].double(), along_y, atol=1e-5, rtol=0)


def test_shrunk_crops_are_area_averaged_and_the_sampling_ratio_is_used() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "global_size": 7})
    x = _images(4, 1)
    expected = F.avg_pool2d(x.float() / 255, 4)  # 28 -> 7: the mean of each 4 x 4 block
    crop = BatchMultiCrop(spec)(x, _keys(4))[0]
    torch.testing.assert_close(_raw(crop, spec), expected, atol=1e-5, rtol=0)
    three = BatchMultiCrop(spec, sampling_ratio=3)(x, _keys(4))[0]
    one = BatchMultiCrop(spec, sampling_ratio=1)(x, _keys(4))[0]
    assert not torch.allclose(three, crop, atol=1e-3) and not torch.allclose(one, crop, atol=1e-3)


# --- photometric ops, in the batch ------------------------------------------------------------------------


def test_local_crops_are_never_solarized() -> None:
    spec = MultiCropSpec(
        **{**FMNIST, **PLAIN, "solarize_prob": 1.0, "local_scale": (1.0, 1.0), "local_size": 28}
    )
    x = _images(4, 1)
    crops = BatchMultiCrop(spec)(x, _keys(4))
    for local in crops[2:]:
        torch.testing.assert_close(_raw(local, spec), x.float() / 255, atol=1e-5, rtol=0)
    assert (_raw(crops[1], spec) - x.float() / 255).abs().max() > 0.5  # the second global view is


def test_solarize_threshold_is_128_of_255() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "solarize_prob": 1.0})
    x = torch.tensor([0.501, 0.503]).repeat_interleave(28 * 14).view(1, 1, 28, 28)
    raw = _raw(BatchMultiCrop(spec)(x, _keys(1))[1], spec)
    assert raw.min().item() == pytest.approx(0.497, abs=1e-5)  # 0.503 >= 128/255: inverted
    assert raw.max().item() == pytest.approx(0.501, abs=1e-5)  # 0.501 < 128/255: kept
    levels = torch.tensor([127, 128], dtype=torch.uint8).repeat_interleave(28 * 14).view(1, 1, 28, 28)
    raw = _raw(BatchMultiCrop(spec)(levels, _keys(1))[1], spec) * 255
    assert sorted({round(v) for v in raw.flatten().tolist()}) == [127]  # 127 kept, 128 -> 255 - 128


def test_flip_mirrors_exactly_the_drawn_images() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "flip_prob": 0.5})
    x, keys = _images(32, 1), _keys(32)
    multicrop = BatchMultiCrop(spec)
    flip = multicrop.params(x, keys)[0].flip
    assert 0 < int(flip.sum()) < 32
    expected = torch.where(flip[:, None, None, None], x.flip(-1), x)
    torch.testing.assert_close(_raw(multicrop(x, keys)[0], spec), expected.float() / 255, atol=1e-5, rtol=0)


def test_brightness_scales_each_image_by_its_drawn_factor_where_jitter_applies() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 0.5, "jitter": (0.4, 0.0, 0.0, 0.0)})
    x, keys = torch.full((400, 1, 28, 28), 0.5), _keys(400, seed=1)
    multicrop = BatchMultiCrop(spec)
    p = multicrop.params(x, keys)[0]
    factor = _raw(multicrop(x, keys)[0], spec).mean(dim=(1, 2, 3)) / 0.5
    expected = torch.where(p.jitter, p.factors[:, 0], 1.0).float()
    torch.testing.assert_close(factor, expected, atol=1e-5, rtol=0)
    assert 0.4 < p.jitter.float().mean() < 0.6


def test_strong_brightness_stays_within_the_pixel_range() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "jitter_prob": 1.0, "jitter": (1.5, 0.0, 0.0, 0.0)})
    raw = _raw(BatchMultiCrop(spec)(torch.full((400, 1, 28, 28), 0.8), _keys(400))[0], spec)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # ColorJitter's range is [max(0, 1 - 1.5), 1 + 1.5]: factors near 0 darken to near black, those above
    # 1.25 saturate at 1.
    assert (raw.amax(dim=(1, 2, 3)) < 0.05).any() and (raw.amin(dim=(1, 2, 3)) > 1 - 1e-5).any()


@pytest.mark.parametrize("jitter", [(0.0, 0.4, 0.0, 0.0), (0.0, 0.0, 0.4, 0.0), (0.0, 0.0, 0.0, 0.1)])
def test_contrast_saturation_and_hue_jitter_change_colour_images(jitter: tuple[float, ...]) -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "in_chans": 3, "jitter_prob": 1.0, "jitter": jitter})
    x = _images(16, 3)
    raw = _raw(BatchMultiCrop(spec)(x, _keys(16))[0], spec)
    changed = (raw - x.float() / 255).abs().amax(dim=(1, 2, 3)) > 0.01
    assert changed.float().mean() > 0.8


def test_grayscale_output_uses_the_luma_weights() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN})
    x = _images(4, 3)
    expected = TF.rgb_to_grayscale(x.float() / 255)
    torch.testing.assert_close(_raw(BatchMultiCrop(spec)(x, _keys(4))[0], spec), expected, atol=1e-5, rtol=0)


def test_random_grayscale_replaces_rgb_by_its_luma_where_drawn() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "in_chans": 3, "grayscale_prob": 0.5})
    x, keys = _images(32, 3), _keys(32)
    multicrop = BatchMultiCrop(spec)
    gray = multicrop.params(x, keys)[0].gray
    assert 0 < int(gray.sum()) < 32
    luma = TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3)
    expected = torch.where(gray[:, None, None, None], luma, x.float() / 255)
    torch.testing.assert_close(_raw(multicrop(x, keys)[0], spec), expected, atol=1e-5, rtol=0)


def _impulses(n: int) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    return x


def test_blur_uses_each_images_drawn_sigma_where_drawn() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "blur_probs": (0.5, 0.0, 0.0), "blur_sigma": (0.5, 2.0)})
    x, keys = _impulses(64), _keys(64)
    multicrop = BatchMultiCrop(spec)
    p = multicrop.params(x, keys)[0]
    assert 0 < int(p.blur.sum()) < 64
    assert p.sigma.min() < 0.7 and p.sigma.max() > 1.8
    out = _raw(multicrop(x, keys)[0], spec)
    kernel = blur_kernel_size(2.0, 28)
    for i in range(64):
        sigma = float(p.sigma[i])
        expected = TF.gaussian_blur(x[i], [kernel, kernel], [sigma, sigma]) if p.blur[i] else x[i]
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def test_a_batch_of_one_image_is_blurred_too() -> None:
    spec = MultiCropSpec(**{**FMNIST, **PLAIN, "blur_probs": (1.0, 0.0, 0.0), "blur_sigma": (1.0, 1.0)})
    out = _raw(BatchMultiCrop(spec)(_impulses(1), _keys(1))[0], spec)[0, 0]
    assert out[14, 14] < 0.5 and out[14, 15] > 0.01


# --- apply_photometric == torchvision, op by op -------------------------------------------------------


def _torchvision_photometric(img: torch.Tensor, p: CropParams, i: int, spec: MultiCropSpec) -> torch.Tensor:
    """Image ``i`` of the crop through torchvision's functional ops with its drawn parameters, in the
    per-sample pipeline's order."""
    x = img
    if p.flip[i]:
        x = TF.horizontal_flip(x)
    if p.jitter[i]:
        brightness, contrast, saturation, hue = p.factors[i].tolist()
        for op in p.order[i].tolist():
            if op == 0:
                x = TF.adjust_brightness(x, brightness)
            elif op == 1:
                x = TF.adjust_contrast(x, contrast)
            elif op == 2:
                x = TF.adjust_saturation(x, saturation)
            else:
                x = TF.adjust_hue(x, hue)
    if p.gray[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        kernel = blur_kernel_size(spec.blur_sigma[1], x.shape[-1])
        sigma = float(p.sigma[i])
        x = TF.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    if p.solarize[i]:
        x = TF.solarize(x, threshold=128 / 255)
    mean, std = spec.stats
    return TF.normalize(x, mean=list(mean), std=list(std))


# Every op at probability 1/2 so both branches of each are exercised.
HALF = {
    "flip_prob": 0.5,
    "jitter_prob": 0.75,
    "grayscale_prob": 0.5,
    "blur_probs": (0.5, 0.5, 0.5),
    "solarize_prob": 0.5,
}


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize(("size", "crop"), [(14, "local"), (28, "global"), (96, "global")])  # 96: conv blur
def test_apply_photometric_equals_torchvision_op_by_op(in_chans: int, size: int, crop: str) -> None:
    spec = MultiCropSpec(global_size=size, local_size=size, n_locals=1, in_chans=in_chans, **HALF)
    n = 24
    keys = _keys(n, seed=size + in_chans)
    params = sample_crop_params(spec, keys, torch.full((n,), 200), torch.full((n,), 200))
    p = params[1 if crop == "global" else 2]  # global2: the crop that may be solarized
    x = torch.rand(n, in_chans, size, size, generator=torch.Generator().manual_seed(size))
    # Both branches of every op occur, and more than one jitter order.
    flags = [p.flip, p.jitter, p.blur] + ([p.gray] if in_chans == 3 else [])
    flags += [p.solarize] if crop == "global" else []
    assert all(0 < int(f.sum()) < n for f in flags)
    assert len({tuple(o) for o in p.order[p.jitter].tolist()}) > 3
    out = apply_photometric(x, p, spec)
    assert out.shape == (n, in_chans, size, size) and out.dtype == torch.float32
    for i in range(n):
        expected = _torchvision_photometric(x[i], p, i, spec)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0, msg=f"image {i} differs")


# --- each image's crops are a function of its own key --------------------------------------------------


def test_an_images_crops_depend_only_on_its_key() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    multicrop = BatchMultiCrop(spec)
    image, key = _images(1, 3, seed=9), _keys(1, seed=3, start=1234)
    a_images = torch.cat([image, _images(7, 3, seed=0)])  # the image first of 8
    b_images = torch.cat([_images(3, 3, seed=1), image, _images(1, 3, seed=2)])  # fourth of 5
    a_keys = torch.cat([key, _keys(7, seed=3)])
    b_keys = torch.cat([_keys(3, seed=5), key, _keys(1, seed=6)])
    for path in (lambda t: t, list):
        crops_a, crops_b = multicrop(path(a_images), a_keys), multicrop(path(b_images), b_keys)
        for crop_a, crop_b in zip(crops_a, crops_b, strict=True):
            torch.testing.assert_close(crop_a[0], crop_b[3], atol=1e-6, rtol=0)
    for pa, pb in zip(multicrop.params(a_images, a_keys), multicrop.params(b_images, b_keys)):
        for field in CropParams.__dataclass_fields__:
            assert torch.equal(getattr(pa, field)[0], getattr(pb, field)[3]), field


def test_the_global_rng_is_neither_used_nor_advanced() -> None:
    spec = MultiCropSpec(**{**FMNIST, "in_chans": 3, "jitter_prob": 1.0, "grayscale_prob": 0.5})
    multicrop, x, keys = BatchMultiCrop(spec), _images(16, 3), _keys(16, seed=5)
    torch.manual_seed(1)
    a = multicrop(x, keys)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = multicrop(x, keys)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.set_rng_state(state)
    multicrop(x, keys)
    assert torch.equal(torch.get_rng_state(), state)
