"""Exact, small pins of the augmentation code: hand-computed boxes and draws, probability thresholds at the
drawn uniform itself, torchvision-equal kernels on chosen pixels, kernel dispatch, pipeline structure, and
every batched op kept on the images' device (checked on the ``meta`` device, which runs on any machine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sopvit.data import BatchMultiCrop, BlockMaskGenerator, MultiCropSpec, MultiCropTransform, fast_kernels
from sopvit.data.batched import _rois
from sopvit.data.counter_rng import _signed, image_keys, uniforms
from sopvit.data.crop_params import (
    _BLUR,
    _FACTORS,
    _FLIP,
    _GRAY,
    _JITTER,
    _SOLARIZE,
    UNIFORMS_PER_CROP,
    CropParams,
    resized_crop_boxes,
    sample_crop_params,
)
from sopvit.data.eval_transforms import SupervisedTrainTransform, TimmRandAugment, _posterize
from sopvit.data.fast_kernels import (
    FastHueColorJitter,
    SeparableGaussianBlur,
    adjust_hue_uint8,
    gaussian_weights,
)
from sopvit.data.masking import default_max_blocks
from sopvit.data.photometric import apply_photometric

META = torch.device("meta")
# Every op off, identity normalisation: apply_photometric returns its input unless a test switches an op on.
IDENTITY = {
    "global_size": 8,
    "local_size": 4,
    "n_locals": 1,
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "flip_prob": 0.0,
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "blur_probs": (0.0, 0.0, 0.0),
    "solarize_prob": 0.0,
}


def _params(n: int, **fields: torch.Tensor) -> CropParams:
    """Hand-built parameters of ``n`` images: no op applies unless ``fields`` says so."""
    no = torch.zeros(n, dtype=torch.bool)
    base = {
        "boxes": torch.zeros(n, 4, dtype=torch.int64),
        "flip": no,
        "jitter": no,
        "order": torch.arange(4).repeat(n, 1),
        "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1),
        "gray": no,
        "blur": no,
        "sigma": torch.ones(n, dtype=torch.float64),
        "solarize": no,
    }
    return CropParams(**{**base, **fields})


def _images(n: int, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# --- counter_rng ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0xD6E8FEB86659FD93 * 2, 2**64 + 2**63 + 5, 3 * 2**64 + 7],
)
def test_signed_is_the_int64_with_the_same_low_64_bits(value: int) -> None:
    got = _signed(value)
    assert -(2**63) <= got < 2**63
    assert (got - value) % 2**64 == 0


# --- crop_params: RandomResizedCrop on hand-made uniforms ----------------------------------------------


def _tries(area: float, log_ratio: float, top: float, left: float) -> torch.Tensor:
    """One image's 40 uniforms: the same (area, log-ratio, top, left) for all 10 tries."""
    return torch.tensor([[area, log_ratio, top, left] * 10], dtype=torch.float64)


@pytest.mark.parametrize(
    ("height", "width", "scale", "u", "box"),
    [
        # area 0.3 at ratio 3/4: w = round(0.47) = 0 never fits -> central fallback
        (1, 1, (0.3, 0.3), (0.0, 0.0, 0.5, 0.5), [0, 0, 1, 1]),
        # area 0.3 at ratio ~4/3: h = round(0.47) = 0 never fits -> central fallback
        (1, 1, (0.3, 0.3), (0.0, 0.999, 0.5, 0.5), [0, 0, 1, 1]),
        # a 1x1 box fits a 2x2 image: top = floor(0.75 * 2) = 1, left = floor(0.25 * 2) = 0
        (2, 2, (0.25, 0.25), (0.0, 0.5, 0.75, 0.25), [1, 0, 1, 1]),
        # a full-width 2x2 box fits a 4x2 image: top = floor(0.9 * 3) = 2
        (4, 2, (0.5, 0.5), (0.0, 0.5, 0.9, 0.0), [2, 0, 2, 2]),
        # left = floor(0.6 * (4 - 1 + 1)) = 2
        (1, 4, (0.25, 0.25), (0.0, 0.5, 0.0, 0.6), [0, 2, 1, 1]),
    ],
)
def test_resized_crop_box_by_hand(
    height: int, width: int, scale: tuple[float, float], u: tuple[float, ...], box: list[int]
) -> None:
    got = resized_crop_boxes(_tries(*u), torch.tensor([height]), torch.tensor([width]), scale)
    assert got.dtype == torch.int64
    assert got.tolist() == [box]


@pytest.mark.parametrize(("height", "width"), [(10**8, 25_165_825), (25_165_825, 10**8)])
def test_fallback_of_a_huge_image_is_computed_in_float64(height: int, width: int) -> None:
    # No try fits at scale 1 (the image is far outside the ratio range); the central crop clamps the
    # ratio: the long side becomes round(short * 4 / 3) = round(33554433.33) = 33554433 (float32 would
    # give 33554432).
    got = resized_crop_boxes(
        _tries(0.5, 0.5, 0.5, 0.5), torch.tensor([height]), torch.tensor([width]), (1.0, 1.0)
    )
    long_side = 33_554_433
    if height > width:
        assert got.tolist() == [[(height - long_side) // 2, 0, long_side, width]]
    else:
        assert got.tolist() == [[0, (width - long_side) // 2, height, long_side]]


def test_jitter_factors_are_exactly_the_float64_ranges_scaled_by_the_uniforms() -> None:
    spec = MultiCropSpec(global_size=8, local_size=4, n_locals=1, jitter=(0.4, 0.3, 0.2, 0.1))
    keys = image_keys(0, 0, torch.arange(6))
    u = uniforms(keys, 0, spec.n_crops * UNIFORMS_PER_CROP).view(6, spec.n_crops, UNIFORMS_PER_CROP)
    lo = torch.tensor([1 - 0.4, 1 - 0.3, 1 - 0.2, -0.1], dtype=torch.float64)
    hi = torch.tensor([1 + 0.4, 1 + 0.3, 1 + 0.2, 0.1], dtype=torch.float64)
    params = sample_crop_params(spec, keys, torch.full((6,), 8), torch.full((6,), 8))
    for c, p in enumerate(params):
        assert torch.equal(p.factors, lo + u[:, c, _FACTORS : _FACTORS + 4] * (hi - lo))


def _crop_uniforms(spec: MultiCropSpec, keys: torch.Tensor) -> torch.Tensor:
    """``(n_crops, n, UNIFORMS_PER_CROP)``: crop c of image i reads row i of block c."""
    n = len(keys)
    return (
        uniforms(keys, 0, spec.n_crops * UNIFORMS_PER_CROP)
        .view(n, spec.n_crops, UNIFORMS_PER_CROP)
        .transpose(0, 1)
    )


def _just_above_in_float64_only(values: torch.Tensor) -> tuple[int, float]:
    """An image whose uniform u has a float64 successor p that rounds to a float32 <= u, and that p."""
    for i, u in enumerate(values.tolist()):
        p = math.nextafter(u, 1.0)
        if float(torch.tensor(p, dtype=torch.float32)) <= u:
            return i, p
    raise AssertionError("no such uniform in this batch")


def test_each_op_applies_iff_its_uniform_is_strictly_below_the_float64_probability() -> None:
    keys = image_keys(5, 1, torch.arange(16))
    base = MultiCropSpec(global_size=8, local_size=4, n_locals=1)
    u = _crop_uniforms(base, keys)
    sizes = torch.full((16,), 8)
    for column, field, crop in [
        (_FLIP, "flip", 0),
        (_JITTER, "jitter", 0),
        (_GRAY, "gray", 0),
        (_BLUR, "blur", 2),
        (_SOLARIZE, "solarize", 1),
    ]:
        drawn = u[crop, :, column]
        # p equal to image 0's uniform: rand < p fails for it
        exact = float(drawn[0])
        # p the next float64 above image i's uniform: applies, though p's float32 rounding would not
        i, above = _just_above_in_float64_only(drawn)
        for p, image, expected in [(exact, 0, False), (above, i, True)]:
            spec = {
                "flip": MultiCropSpec(global_size=8, local_size=4, n_locals=1, flip_prob=p),
                "jitter": MultiCropSpec(global_size=8, local_size=4, n_locals=1, jitter_prob=p),
                "gray": MultiCropSpec(global_size=8, local_size=4, n_locals=1, grayscale_prob=p),
                "blur": MultiCropSpec(global_size=8, local_size=4, n_locals=1, blur_probs=(1.0, 0.1, p)),
                "solarize": MultiCropSpec(global_size=8, local_size=4, n_locals=1, solarize_prob=p),
            }[field]
            params = sample_crop_params(spec, keys, sizes, sizes)
            flags = getattr(params[crop], field)
            assert bool(flags[image]) is expected, (field, p)
            assert torch.equal(flags, drawn < p)


# --- batched --------------------------------------------------------------------------------------------


def test_rois_are_index_x1_y1_x2_y2_rows_crop_major() -> None:
    a = _params(2, boxes=torch.tensor([[1, 2, 3, 4], [0, 0, 5, 6]]))
    b = _params(2, boxes=torch.tensor([[7, 1, 2, 2], [3, 4, 1, 1]]))
    rois = _rois([a, b])
    assert rois.dtype == torch.float32
    assert rois.tolist() == [[0, 2, 1, 6, 4], [1, 0, 0, 6, 5], [0, 1, 7, 3, 9], [1, 4, 3, 5, 4]]
    assert _rois([]).shape == (0, 5)


def test_batch_multi_crop_repr_names_the_class_and_spec() -> None:
    spec = MultiCropSpec(**IDENTITY)
    assert repr(BatchMultiCrop(spec)) == f"BatchMultiCrop({spec})"


def _busy_spec(in_chans: int = 3) -> MultiCropSpec:
    """Every op on with probability 1/2: flags differ across a batch, so each op runs on a subset."""
    return MultiCropSpec(
        global_size=8,
        local_size=4,
        n_locals=2,
        in_chans=in_chans,
        flip_prob=0.5,
        jitter_prob=0.5,
        grayscale_prob=0.5,
        blur_probs=(0.5, 0.5, 0.5),
        solarize_prob=0.5,
    )


@pytest.mark.parametrize("in_chans", [3, 1])
def test_batched_crops_are_made_on_the_images_device(in_chans: int) -> None:
    spec = _busy_spec(in_chans)
    keys = image_keys(0, 0, torch.arange(12))
    images = torch.empty(12, 3, 16, 16, dtype=torch.uint8, device=META)
    crops = BatchMultiCrop(spec)(images, keys)
    sizes = spec.crop_sizes()
    assert [(c.device, tuple(c.shape)) for c in crops] == [(META, (12, in_chans, s, s)) for s in sizes]
    listed = [torch.empty(1, 10 + i, 12, dtype=torch.uint8, device=META) for i in range(12)]
    crops = BatchMultiCrop(spec)(listed, keys)
    assert [(c.device, tuple(c.shape)) for c in crops] == [(META, (12, in_chans, s, s)) for s in sizes]


def test_an_empty_batch_is_on_the_images_device() -> None:
    spec = _busy_spec()
    images = torch.empty(0, 3, 16, 16, dtype=torch.uint8, device=META)
    crops = BatchMultiCrop(spec)(images, torch.empty(0, dtype=torch.int64))
    assert [(c.device, tuple(c.shape)) for c in crops] == [(META, (0, 3, s, s)) for s in spec.crop_sizes()]


def test_counter_uniforms_and_gaussian_weights_stay_on_their_inputs_device() -> None:
    u = uniforms(torch.zeros(3, dtype=torch.int64, device=META), 1, 5)
    assert u.device == META and u.shape == (3, 5)
    w = gaussian_weights(5, torch.ones(2, device=META))
    assert w.device == META and w.shape == (2, 5)


# --- photometric ----------------------------------------------------------------------------------------


def test_photometric_ops_on_subsets_run_on_the_crops_device() -> None:
    spec = MultiCropSpec(**{**IDENTITY, "jitter": (0.4, 0.4, 0.2, 0.1), "blur_sigma": (0.1, 1.0)})
    half = torch.tensor([True, False] * 3)
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    p = _params(6, flip=half, jitter=half, order=order, gray=~half, blur=half, solarize=~half)
    out = apply_photometric(torch.empty(6, 3, 8, 8, device=META), p, spec)
    assert out.device == META and out.shape == (6, 3, 8, 8)


def test_brightness_alone_is_exactly_a_clamped_product() -> None:
    spec = MultiCropSpec(**{**IDENTITY, "jitter": (0.8, 0.0, 0.0, 0.0)})
    x = _images(4)
    factors = torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.7, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    p = _params(4, jitter=torch.ones(4, dtype=torch.bool), factors=factors)
    out = apply_photometric(x, p, spec)
    assert torch.equal(out, (x * factors[:, 0].float()[:, None, None, None]).clamp(0.0, 1.0))


def test_hue_shift_equals_torchvisions_adjust_hue_on_float_crops() -> None:
    spec = MultiCropSpec(**{**IDENTITY, "jitter": (0.0, 0.0, 0.0, 0.5)})
    x = _images(4, size=16)
    shifts = [0.375, -0.4375, 0.25, -0.125]  # float32-exact, so torchvision adds the same value
    factors = torch.tensor([[1.0, 1.0, 1.0, s] for s in shifts], dtype=torch.float64)
    p = _params(4, jitter=torch.ones(4, dtype=torch.bool), factors=factors)
    out = apply_photometric(x, p, spec)
    for i, s in enumerate(shifts):
        assert torch.equal(out[i], TF.adjust_hue(x[i], s))


def test_float64_crops_are_normalised_in_float64() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = MultiCropSpec(**{**IDENTITY, "mean": mean, "std": std})
    x = _images(2).double()
    out = apply_photometric(x, _params(2), spec)
    expected = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert out.dtype == torch.float64 and torch.equal(out, expected)


# --- fast_kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixel", "hue"),
    [
        ((1, 1, 0), 0.0),  # chroma 1: hue = (g - b) / 1, not / 2
        ((10, 9, 9), 0.25),
        ((200, 201, 200), -0.3),
        ((24, 27, 132), 0.49),  # rotated hue lands in [6, 7) sixths: one wrap by 6
    ],
)
def test_fast_hue_equals_torchvision_on_chosen_pixels(pixel: tuple[int, int, int], hue: float) -> None:
    img = torch.tensor(pixel, dtype=torch.uint8).view(3, 1, 1)
    assert adjust_hue_uint8(img, hue).tolist() == TF.adjust_hue(img, hue).tolist()


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[torch.Tensor]:
    calls: list[torch.Tensor] = []
    original = getattr(fast_kernels, name)

    def spy(img: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(img)
        return original(img, *args)

    monkeypatch.setattr(fast_kernels, name, spy)
    return calls


@pytest.mark.parametrize(
    ("image", "fast"),
    [
        (torch.zeros(3, 5, 6, dtype=torch.uint8), True),
        (torch.zeros(1, 5, 6, dtype=torch.uint8), True),
        (torch.zeros(3, 3, 5, 6, dtype=torch.uint8), False),  # a batch: torchvision's kernel
        (torch.zeros(3, 5, 6), False),  # float: torchvision's kernel
    ],
)
def test_separable_blur_takes_the_fast_kernel_for_uint8_chw_only(
    monkeypatch: pytest.MonkeyPatch, image: torch.Tensor, fast: bool
) -> None:
    calls = _spy(monkeypatch, "gaussian_blur_uint8")
    out = SeparableGaussianBlur(3, sigma=1.0)(image)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert len(calls) == int(fast)


@pytest.mark.parametrize(
    ("image", "fast"),
    [
        (torch.zeros(3, 5, 6, dtype=torch.uint8), True),
        (torch.zeros(2, 3, 5, 6, dtype=torch.uint8), False),
        (torch.zeros(3, 5, 6), False),
    ],
)
def test_fast_hue_jitter_takes_the_fast_kernel_for_uint8_rgb_only(
    monkeypatch: pytest.MonkeyPatch, image: torch.Tensor, fast: bool
) -> None:
    calls = _spy(monkeypatch, "adjust_hue_uint8")
    out = FastHueColorJitter(hue=0.2)(image)
    assert out.shape == image.shape
    assert len(calls) == int(fast)


# --- masking --------------------------------------------------------------------------------------------


def test_default_max_blocks_just_above_14_and_28() -> None:
    assert default_max_blocks((15, 15)) == 21
    assert default_max_blocks((29, 8)) == 26


def test_add_block_returns_0_when_no_rectangle_fits() -> None:
    # Height / width fixed at 4 on a 1-row grid: h = round(2 sqrt(area)) >= 2 never fits.
    gen = BlockMaskGenerator((1, 6), ratio=1.0, min_aspect=4.0, max_aspect=4.0, min_num_patches=1)
    mask = np.zeros((1, 6), dtype=bool)
    draws = iter(torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist())
    assert gen._add_block(mask, 6, lambda: next(draws)) == 0
    assert not mask.any()


def test_from_uniforms_masks_a_target_of_one_patch() -> None:
    gen = BlockMaskGenerator((2, 2), ratio=0.25, min_num_patches=1, max_attempts=1, max_blocks=1)
    # gate, ratio, then area, aspect ~1 (h = w = 1), top = floor(0.75 * 2) = 1, left = floor(0.25 * 2) = 0
    u = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.75, 0.25]], dtype=torch.float64)
    assert gen.from_uniforms(u).tolist() == [[[False, False], [True, False]]]


def test_from_uniforms_stays_on_the_uniforms_device() -> None:
    gen = BlockMaskGenerator((4, 5), ratio=(0.1, 0.5), max_blocks=3)
    mask = gen.from_uniforms(torch.empty(3, gen.uniforms_per_mask, dtype=torch.float64, device=META))
    assert mask.device == META and mask.shape == (3, 4, 5) and mask.dtype == torch.bool


# --- transforms -----------------------------------------------------------------------------------------


def test_no_blur_step_where_the_kernel_would_be_one_pixel() -> None:
    spec = MultiCropSpec(global_size=8, local_size=3, n_locals=1, blur_probs=(1.0, 1.0, 1.0))
    transform = MultiCropTransform(spec)

    def blurs(pipeline: v2.Compose) -> int:
        return sum(
            isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
            for t in pipeline.transforms
        )

    assert blurs(transform.global1) == 1
    assert blurs(transform.local) == 0


def test_posterize_to_0_bits_is_black_and_otherwise_timms() -> None:
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5, mode="RGB")
    black = _posterize(img, 0)
    assert black.mode == "RGB" and black.size == (4, 4) and not np.asarray(black).any()
    for bits in (1, 4):
        kept = _posterize(img, bits)
        assert np.asarray(kept).any()
        assert np.array_equal(np.asarray(kept), np.asarray(timm_posterize(img, bits)))


def test_timm_rand_augment_rejects_a_non_string_and_reports_its_config() -> None:
    with pytest.raises(ValueError, match="not a timm RandAugment string"):
        TimmRandAugment(None, 32, (0.5, 0.5, 0.5))  # type: ignore[arg-type]
    aug = TimmRandAugment("rand-m9-mstd0.5-inc1", 32, (0.485, 0.456, 0.406, 1.01))
    assert repr(aug) == "TimmRandAugment('rand-m9-mstd0.5-inc1')"
    assert aug.config == "rand-m9-mstd0.5-inc1"
    assert aug.hparams == {
        "translate_const": 14,
        "img_mean": (124, 116, 104, 255),
        "interpolation": str_to_pil_interp("bicubic"),
    }


def test_supervised_transform_steps() -> None:
    default = SupervisedTrainTransform(32, 3, randaug_n=2, crop_scale=(0.5, 1.0))
    steps = default.pipeline.transforms
    (rrc,) = [t for t in steps if isinstance(t, v2.RandomResizedCrop)]
    assert rrc.interpolation == v2.InterpolationMode.BILINEAR
    (randaug,) = [t for t in steps if isinstance(t, v2.RandAugment)]
    assert randaug.num_ops == 2 and randaug.magnitude == 9
    assert not any(
        isinstance(t, (v2.RandAugment, RandomErasing))
        for t in SupervisedTrainTransform(32, 3).pipeline.transforms
    )

    bicubic = SupervisedTrainTransform(32, 3, interpolation="bicubic").pipeline.transforms
    assert [t.interpolation for t in bicubic if isinstance(t, v2.RandomResizedCrop)] == [
        v2.InterpolationMode.BICUBIC
    ]

    timm = SupervisedTrainTransform(
        32, 3, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25
    ).pipeline.transforms
    (aug,) = [t for t in timm if isinstance(t, TimmRandAugment)]
    assert aug.hparams["interpolation"] == str_to_pil_interp("bilinear")
    (erase,) = [t for t in timm if isinstance(t, RandomErasing)]
    assert (erase.probability, erase.mode, erase.max_count, erase.device) == (0.25, "pixel", 1, "cpu")
    assert erase.per_pixel

    assert any(
        isinstance(t, RandomErasing) for t in SupervisedTrainTransform(32, 3, reprob=1.0).pipeline.transforms
    )
    with pytest.raises(ValueError, match="reprob"):
        SupervisedTrainTransform(32, 3, reprob=1.5)
    with pytest.raises(ValueError, match="both ask for RandAugment"):
        SupervisedTrainTransform(32, 3, randaug_n=1, auto_augment="rand-m9-mstd0.5-inc1")
