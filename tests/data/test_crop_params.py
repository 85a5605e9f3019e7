"""The batched path's random crop parameters have the per-sample path's distribution.

``resized_crop_boxes`` and ``sample_crop_params`` are compared with the torchvision v2 transforms that
``MultiCropTransform`` builds: the crop boxes by two-sample Kolmogorov-Smirnov tests against
``RandomResizedCrop.make_params`` itself, the photometric draws by binomial, chi-square and one-sample KS
tests against the probabilities and ranges read off the per-sample pipelines. Every test is seeded, so it
passes or fails deterministically; thresholds are at significance 1e-4 (|z| < 5 for binomial rates).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from sopvit.data import MultiCropSpec, MultiCropTransform
from sopvit.data.counter_rng import image_keys, uniforms
from sopvit.data.crop_params import (
    RRC_RATIO,
    UNIFORMS_PER_CROP,
    CropParams,
    resized_crop_boxes,
    sample_crop_params,
)

N = 20_000
ALPHA = 1e-4
# Kolmogorov's asymptotic tail: P(sqrt(n_eff) D > c) ~ 2 exp(-2 c^2), so c(alpha) = sqrt(-ln(alpha / 2) / 2).
# With ties (integer box sizes and positions) the test only gets more conservative.
KS_C = math.sqrt(-math.log(ALPHA / 2) / 2)
Z_MAX = 5.0  # two-sided normal p of 5.7e-7, binomial rates
CROPS = {"global1": 0, "global2": 1, "local": 2}


# --- statistics ---------------------------------------------------------------------------------------


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    """sup |F_a - F_b| over the pooled sample (exact with ties: right-continuous ECDFs)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _ks_two_sample_critical(n: int, m: int) -> float:
    """Two-sample KS critical value at ALPHA = 1e-4."""
    return KS_C * math.sqrt((n + m) / (n * m))


def _ks_uniform(x: np.ndarray, lo: float, hi: float) -> float:
    """One-sample KS statistic of ``x`` against U(lo, hi)."""
    u = np.sort((np.asarray(x, dtype=np.float64) - lo) / (hi - lo))
    i = np.arange(1, len(u) + 1)
    return float(max((i / len(u) - u).max(), (u - (i - 1) / len(u)).max()))


def _assert_uniform(x: torch.Tensor, lo: float, hi: float) -> None:
    x = x.double()
    assert x.min() >= lo and x.max() <= hi
    width = hi - lo
    assert x.min() < lo + 0.01 * width and x.max() > hi - 0.01 * width  # the whole range is reached
    d = _ks_uniform(x.numpy(), lo, hi)
    assert d < KS_C / math.sqrt(len(x)), f"KS D={d:.4f} against U({lo}, {hi})"


def _binomial_z(successes: int, n: int, p: float) -> float:
    return (successes - n * p) / math.sqrt(n * p * (1 - p))


def _assert_rate(flags: torch.Tensor, p: float, what: str) -> None:
    k, n = int(flags.sum()), flags.numel()
    if p in (0.0, 1.0):
        assert k == round(p * n), f"{what}: {k}/{n} with p={p}"
    else:
        z = _binomial_z(k, n, p)
        assert abs(z) < Z_MAX, f"{what}: rate {k / n:.4f} vs p={p} (z={z:.2f})"


def _two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 0.0 if k1 / n1 == k2 / n2 else math.inf
    return (k1 / n1 - k2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))


# --- the per-sample path ------------------------------------------------------------------------------


def _pipelines(spec: MultiCropSpec) -> dict[str, v2.Compose]:
    per_sample = MultiCropTransform(spec)
    return {"global1": per_sample.global1, "global2": per_sample.global2, "local": per_sample.local}


def _steps(pipeline: v2.Compose) -> dict[str, Any]:
    """The per-sample pipeline's random steps by kind; probabilities 0 for steps it leaves out."""
    steps: dict[str, Any] = {"flip": 0.0, "jitter": 0.0, "gray": 0.0, "blur": 0.0, "solarize": 0.0}
    for t in pipeline.transforms:
        if isinstance(t, v2.RandomResizedCrop):
            steps["crop"] = t
        elif isinstance(t, v2.RandomHorizontalFlip):
            steps["flip"] = t.p
        elif isinstance(t, v2.RandomGrayscale):
            steps["gray"] = t.p
        elif isinstance(t, v2.RandomSolarize):
            assert t.threshold == 128
            steps["solarize"] = t.p
        elif isinstance(t, v2.RandomApply):
            (inner,) = t.transforms
            if isinstance(inner, v2.ColorJitter):
                steps["jitter"], steps["color_jitter"] = t.p, inner
            elif isinstance(inner, v2.GaussianBlur):
                steps["blur"], steps["gaussian_blur"] = t.p, inner
            else:
                raise AssertionError(f"unexpected step {inner}")
    return steps


def _torchvision_boxes(crop: v2.RandomResizedCrop, height: int, width: int, n: int, seed: int) -> np.ndarray:
    """``n`` (top, left, h, w) from torchvision's own ``make_params``, seeded by the global RNG."""
    image = [torch.zeros(3, height, width)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rows = [crop.make_params(image) for _ in range(n)]
    return np.array([[r["top"], r["left"], r["height"], r["width"]] for r in rows], dtype=np.int64)


def _our_boxes(scale: tuple[float, float], height: int, width: int, n: int, seed: int) -> np.ndarray:
    u = uniforms(image_keys(seed, 0, torch.arange(n)), 0, 40)
    size = torch.full((n,), height), torch.full((n,), width)
    return resized_crop_boxes(u, *size, scale).numpy()


def _params(spec: MultiCropSpec, n: int = N, seed: int = 0, size: int = 256) -> list[CropParams]:
    keys = image_keys(seed, 0, torch.arange(n))
    return sample_crop_params(spec, keys, torch.full((n,), size), torch.full((n,), size))


# --- crop boxes ---------------------------------------------------------------------------------------

GLOBAL, LOCAL = MultiCropSpec().global_scale, MultiCropSpec().local_scale
BOX_CASES = [
    (375, 500, "global1"),
    (375, 500, "local"),
    (150, 400, "global1"),  # wide: about a third of the crops fall back
    (30, 400, "local"),  # very thin: about 40% fall back to the central crop
    (400, 30, "local"),  # very tall: the other branch of the fallback
]


def _rrc(kind: str) -> v2.RandomResizedCrop:
    crop = _steps(_pipelines(MultiCropSpec())[kind])["crop"]
    assert isinstance(crop, v2.RandomResizedCrop)
    return crop


def test_the_per_sample_crops_use_the_spec_scales_and_the_default_ratio() -> None:
    spec = MultiCropSpec()
    for kind, scale in (("global1", spec.global_scale), ("global2", spec.global_scale), ("local", LOCAL)):
        crop = _steps(_pipelines(spec)[kind])["crop"]
        assert tuple(crop.scale) == scale
        assert tuple(crop.ratio) == pytest.approx(RRC_RATIO, abs=0)


@pytest.mark.parametrize(("height", "width", "kind"), BOX_CASES)
def test_crop_boxes_follow_random_resized_crop_in_distribution(height: int, width: int, kind: str) -> None:
    crop = _rrc(kind)
    ours = _our_boxes(tuple(crop.scale), height, width, N, seed=1)
    theirs = _torchvision_boxes(crop, height, width, N, seed=1)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()

    def features(boxes: np.ndarray) -> dict[str, np.ndarray]:
        top, left, h, w = boxes.T.astype(np.float64)
        free_h, free_w = height - h, width - w
        return {
            "area fraction": h * w / (height * width),
            "aspect ratio": w / h,
            "top / (H - h)": top[free_h > 0] / free_h[free_h > 0],
            "left / (W - w)": left[free_w > 0] / free_w[free_w > 0],
        }

    ours_f, theirs_f = features(ours), features(theirs)
    for name in ours_f:
        a, b = ours_f[name], theirs_f[name]
        assert len(a) > N // 10 and len(b) > N // 10, name
        d = _ks_two_sample(a, b)
        assert d < _ks_two_sample_critical(len(a), len(b)), f"{name}: KS D={d:.4f}"


FALLBACK_CASES = [(150, 400, GLOBAL), (30, 400, LOCAL), (400, 30, LOCAL)]


@pytest.mark.parametrize(("height", "width", "scale"), FALLBACK_CASES)
def test_fallback_is_as_frequent_as_torchvisions(height: int, width: int, scale: tuple[float, float]) -> None:
    fallback = _torchvision_fallback(height, width)
    crop = v2.RandomResizedCrop(28, scale=scale, antialias=True)
    ours = (_our_boxes(scale, height, width, N, seed=2) == fallback).all(axis=1)
    theirs = (_torchvision_boxes(crop, height, width, N, seed=2) == fallback).all(axis=1)
    assert 0.1 < theirs.mean() < 0.9  # the fallback is frequent but not certain here
    z = _two_proportion_z(int(ours.sum()), N, int(theirs.sum()), N)
    assert abs(z) < Z_MAX, f"fallback rate {ours.mean():.4f} vs torchvision's {theirs.mean():.4f}"


def test_a_very_thin_image_always_falls_back_as_torchvision_does() -> None:
    for scale in (GLOBAL, LOCAL):
        ours = _our_boxes(scale, 12, 400, 2000, seed=3)
        theirs = _torchvision_boxes(v2.RandomResizedCrop(28, scale=scale), 12, 400, 2000, seed=3)
        assert (ours == [0, 192, 12, 16]).all() and (theirs == [0, 192, 12, 16]).all()


def _torchvision_fallback(height: int, width: int) -> np.ndarray:
    """torchvision's central crop: a target area of twice the image never fits, so all 10 tries fail."""
    crop = v2.RandomResizedCrop(8, scale=(2.0, 2.0), antialias=True)
    (box,) = _torchvision_boxes(crop, height, width, 1, seed=0)
    return box


SIDES = [1, 2, 3, 5, 7, 12, 30, 99, 100, 101, 150, 375, 400, 500, 1001]


def test_the_fallback_box_equals_torchvisions_exactly() -> None:
    sizes = [(h, w) for h in SIDES for w in SIDES]
    heights, widths = (torch.tensor(v) for v in zip(*sizes))
    u = uniforms(image_keys(0, 0, torch.arange(len(sizes))), 0, 40)
    ours = resized_crop_boxes(u, heights, widths, (2.0, 2.0)).numpy()
    theirs = np.stack([_torchvision_fallback(h, w) for h, w in sizes])
    np.testing.assert_array_equal(ours, theirs)
    assert ((ours[:, 2] == heights.numpy()) & (ours[:, 3] == widths.numpy())).any()  # whole-image branch
    assert (ours[:, 2] < heights.numpy()).any() and (ours[:, 3] < widths.numpy()).any()  # both clamped ones


def test_the_first_fitting_try_is_taken() -> None:
    n = 4000
    u = uniforms(image_keys(4, 0, torch.arange(n)), 0, 40)
    heights, widths = torch.full((n,), 150), torch.full((n,), 400)
    boxes = resized_crop_boxes(u, heights, widths, GLOBAL)
    # Each try alone (its 4 columns repeated 10 times): where it fits it gives its box, else the fallback.
    fallback = torch.tensor(_torchvision_fallback(150, 400))
    expected = torch.zeros_like(boxes) + fallback
    decided = torch.zeros(n, dtype=torch.bool)
    for t in range(10):
        alone = resized_crop_boxes(u[:, 4 * t : 4 * t + 4].repeat(1, 10), heights, widths, GLOBAL)
        fits = ~(alone == fallback).all(dim=1) & ~decided
        expected[fits] = alone[fits]
        decided |= fits
    assert decided.float().mean() > 0.5
    assert torch.equal(boxes, expected)


def test_each_crop_reads_its_own_uniforms_and_locals_can_be_added() -> None:
    spec = MultiCropSpec(n_locals=3)
    n = 500
    keys = image_keys(5, 2, torch.arange(n))
    heights, widths = torch.randint(20, 600, (n,)), torch.randint(20, 600, (n,))
    params = sample_crop_params(spec, keys, heights, widths)
    assert len(params) == spec.n_crops
    u = uniforms(keys, 0, spec.n_crops * UNIFORMS_PER_CROP)
    for c, p in enumerate(params):
        scale = spec.global_scale if c < 2 else spec.local_scale
        own = u[:, c * UNIFORMS_PER_CROP : (c + 1) * UNIFORMS_PER_CROP]
        assert torch.equal(p.boxes, resized_crop_boxes(own, heights, widths, scale))
        top, left, h, w = p.boxes.unbind(1)
        assert (top + h <= heights).all() and (left + w <= widths).all()
    more = sample_crop_params(MultiCropSpec(n_locals=6), keys, heights, widths)
    for a, b in zip(params, more):
        for field in CropParams.__dataclass_fields__:
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_param_shapes_and_dtypes() -> None:
    (p, *_) = _params(MultiCropSpec(n_locals=1), n=7)
    assert p.boxes.shape == (7, 4) and p.boxes.dtype == torch.int64
    assert p.order.shape == (7, 4) and p.order.dtype == torch.int64
    assert p.factors.shape == (7, 4) and p.factors.dtype == torch.float64
    assert p.sigma.shape == (7,) and p.sigma.dtype == torch.float64
    for flag in (p.flip, p.jitter, p.gray, p.blur, p.solarize):
        assert flag.shape == (7,) and flag.dtype == torch.bool


# --- photometric draws --------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("kind", list(CROPS))
def test_each_op_applies_with_the_per_sample_pipelines_probability(kind: str, in_chans: int) -> None:
    spec = MultiCropSpec(in_chans=in_chans, n_locals=1)
    steps = _steps(_pipelines(spec)[kind])
    blur = dict(zip(CROPS, spec.blur_probs))[kind]
    expected = {
        "flip": 0.5,
        "jitter": 0.8,
        "gray": 0.2 if in_chans == 3 else 0.0,
        "blur": blur,
        "solarize": 0.2 if kind == "global2" else 0.0,
    }
    assert expected["blur"] == {"global1": 1.0, "global2": 0.1, "local": 0.5}[kind]
    # The spec's probabilities are the ones the per-sample path applies.
    assert {k: steps[k] for k in expected} == expected
    p = _params(spec)[CROPS[kind]]
    for name, prob in expected.items():
        _assert_rate(getattr(p, name), prob, f"{kind} {name}")


@pytest.mark.parametrize("kind", list(CROPS))
def test_jitter_factors_are_uniform_on_color_jitters_ranges(kind: str) -> None:
    spec = MultiCropSpec(n_locals=1)
    jitter = _steps(_pipelines(spec)[kind])["color_jitter"]
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    assert [v for r in ranges for v in r] == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.8, 1.2, -0.1, 0.1])
    factors = _params(spec, seed=6)[CROPS[kind]].factors
    for column, (lo, hi) in enumerate(ranges):
        _assert_uniform(factors[:, column], lo, hi)


def test_grayscale_output_draws_identity_saturation_and_hue() -> None:
    spec = MultiCropSpec(in_chans=1, n_locals=1)
    jitter = _steps(_pipelines(spec)["global1"])["color_jitter"]
    assert jitter.saturation is None and jitter.hue is None  # the per-sample path leaves them out
    for p in _params(spec, n=2000):
        assert (p.factors[:, 2] == 1.0).all() and (p.factors[:, 3] == 0.0).all()
        _assert_uniform(p.factors[:, 0], 0.6, 1.4)
        assert not p.gray.any()


@pytest.mark.parametrize("kind", list(CROPS))
def test_the_24_jitter_orders_are_equally_likely(kind: str) -> None:
    order = _params(MultiCropSpec(n_locals=1), seed=7)[CROPS[kind]].order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(N, 4))  # permutations of 0..3
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].double()
    assert len(counts) == 24
    expected = N / 24
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # P(chi-square with 23 dof > chi2) = Q(23 / 2, chi2 / 2), the regularised upper incomplete gamma.
    p_value = float(torch.special.gammaincc(torch.tensor(11.5), torch.tensor(chi2 / 2)))
    assert p_value > ALPHA, f"chi2={chi2:.1f} (p={p_value:.2g})"


@pytest.mark.parametrize("kind", list(CROPS))
def test_blur_sigma_is_uniform_on_the_spec_range(kind: str) -> None:
    spec = MultiCropSpec(n_locals=1)
    blur = _steps(_pipelines(spec)[kind])["gaussian_blur"]
    assert tuple(blur.sigma) == spec.blur_sigma == (0.1, 2.0)
    _assert_uniform(_params(spec, seed=8)[CROPS[kind]].sigma, *spec.blur_sigma)


def test_probabilities_and_ranges_follow_a_custom_spec() -> None:
    spec = MultiCropSpec(
        n_locals=1,
        flip_prob=0.3,
        jitter_prob=0.6,
        jitter=(0.2, 0.5, 0.1, 0.3),
        grayscale_prob=0.35,
        blur_probs=(0.7, 0.25, 0.05),
        blur_sigma=(0.5, 1.5),
        solarize_prob=0.45,
    )
    params = _params(spec, seed=9)
    for kind, c in CROPS.items():
        steps, p = _steps(_pipelines(spec)[kind]), params[c]
        for name in ("flip", "jitter", "gray", "blur", "solarize"):
            _assert_rate(getattr(p, name), steps[name], f"{kind} {name}")
        jitter = steps["color_jitter"]
        for column, r in enumerate([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]):
            _assert_uniform(p.factors[:, column], *r)
        _assert_uniform(p.sigma, *steps["gaussian_blur"].sigma)


def _param_columns(p: CropParams) -> dict[str, torch.Tensor]:
    """One crop's parameters as float columns; the order as each op's position in it."""
    columns = {
        "flip": p.flip,
        "jitter": p.jitter,
        "gray": p.gray,
        "blur": p.blur,
        "solarize": p.solarize,
        "sigma": p.sigma,
        "area": p.boxes[:, 2] * p.boxes[:, 3],  # one box feature: top and left depend on h and w
    }
    columns |= {f"factor{i}": p.factors[:, i] for i in range(4)}
    columns |= {f"position of op {i}": p.order.argsort(dim=1)[:, i] for i in range(4)}
    return {k: v.double() for k, v in columns.items() if v.double().std() > 0}


def _max_abs_correlation(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, pair = 0.0, ""
    for name_a, x in a.items():
        for name_b, y in b.items():
            both_positions = name_a.startswith("position") and name_b.startswith("position")
            if a is b and (name_a >= name_b or both_positions):
                continue  # each pair once; the positions of one permutation are dependent by construction
            r = abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
            if r > worst:
                worst, pair = r, f"{name_a} vs {name_b}"
    return worst, pair


@pytest.mark.parametrize("kind", list(CROPS))
def test_the_parameters_of_one_crop_are_independent(kind: str) -> None:
    columns = _param_columns(_params(MultiCropSpec(n_locals=1), seed=10)[CROPS[kind]])
    worst, pair = _max_abs_correlation(columns, columns)
    # Under independence r ~ N(0, 1/N): 5 / sqrt(N) is a 5-sigma bound.
    assert worst < Z_MAX / math.sqrt(N), f"{pair}: |r| = {worst:.3f}"


def test_different_crops_and_images_are_independent() -> None:
    params = _params(MultiCropSpec(n_locals=1), seed=11)
    columns = [_param_columns(p) for p in params]
    bound = Z_MAX / math.sqrt(N)
    for a in range(3):
        for b in range(a + 1, 3):
            worst, pair = _max_abs_correlation(columns[a], columns[b])
            assert worst < bound, f"crops {a} and {b}: {pair}: |r| = {worst:.3f}"
    # Neighbouring images (consecutive dataset indices) of the same crop.
    shifted = [{k: v[1:] for k, v in c.items()} for c in columns]
    head = [{k: v[:-1] for k, v in c.items()} for c in columns]
    for c in range(3):
        worst, pair = _max_abs_correlation(head[c], shifted[c])
        assert worst < Z_MAX / math.sqrt(N - 1), f"images i, i+1 of crop {c}: {pair}: |r| = {worst:.3f}"
