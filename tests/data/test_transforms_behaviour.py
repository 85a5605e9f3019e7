"""Per-sample transforms pinned to the iBOT / DINO recipes: the steps built, their settings, validation."""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sopvit.data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropSpec, MultiCropTransform
from sopvit.data import transforms as transforms_module
from sopvit.data.eval_transforms import SupervisedTrainTransform
from sopvit.data.fast_kernels import (
    FastHueColorJitter,
    SeparableGaussianBlur,
    adjust_hue_uint8,
    gaussian_blur_uint8,
)
from sopvit.data.transforms import to_uint8_chw

SMALL = {"global_size": 32, "local_size": 16, "n_locals": 2}
GRAY_MEAN, GRAY_STD = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3


def _describe(t: Any) -> tuple[Any, ...]:
    """Class name and public settings of a transform, nested transforms included."""
    settings = []
    for key, value in sorted(vars(t).items()):
        if key.startswith("_") or key == "training":
            continue
        if key == "transforms":
            value = [_describe(inner) for inner in value]
        elif isinstance(value, Enum):
            value = value.value
        settings.append((key, value))
    return (type(t).__name__, *settings)


def _steps(pipeline: v2.Compose) -> list[tuple[Any, ...]]:
    return [_describe(t) for t in pipeline.transforms]


def _crop(size: int, scale: tuple[float, float]) -> tuple[Any, ...]:
    return _describe(
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    )


def test_rgb_multicrop_recipe() -> None:
    spec = MultiCropSpec(**SMALL)
    t = MultiCropTransform(spec)
    jitter = _describe(v2.RandomApply([FastHueColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8))
    blur = _describe(SeparableGaussianBlur(13, sigma=(0.1, 2.0)))
    tail = [
        _describe(v2.ToDtype(torch.float32, scale=True)),
        _describe(v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))),
    ]

    def expected(size: int, scale: tuple[float, float], blur_p: float, solarize: bool) -> list:
        steps = [_crop(size, scale), _describe(v2.RandomHorizontalFlip(0.5)), jitter]
        steps += [_describe(v2.RandomGrayscale(0.2)), ("RandomApply", ("p", blur_p), ("transforms", [blur]))]
        if solarize:
            steps.append(_describe(v2.RandomSolarize(threshold=128, p=0.2)))
        return steps + tail

    assert _steps(t.global1) == expected(32, (0.32, 1.0), 1.0, solarize=False)
    assert _steps(t.global2) == expected(32, (0.32, 1.0), 0.1, solarize=True)
    blur = _describe(SeparableGaussianBlur(13, sigma=(0.1, 2.0)))
    assert _steps(t.local) == expected(16, (0.05, 0.4), 0.5, solarize=False)


def test_gray_multicrop_recipe_drops_colour_steps() -> None:
    spec = MultiCropSpec(**SMALL, in_chans=1, blur_probs=(0.0, 0.5, 0.5), solarize_prob=0.0)
    t = MultiCropTransform(spec)
    assert _steps(t.global1) == [
        _crop(32, (0.32, 1.0)),
        _describe(v2.RandomHorizontalFlip(0.5)),
        _describe(v2.RandomApply([FastHueColorJitter(0.4, 0.4, 0.0, 0.0)], p=0.8)),
        _describe(v2.ToDtype(torch.float32, scale=True)),
        _describe(v2.Normalize([GRAY_MEAN], [GRAY_STD])),
    ]
    assert [s[0] for s in _steps(t.global2)][-3:] == [
        "RandomApply",
        "ToDtype",
        "Normalize",
    ]  # blur, no solarize


def test_steps_switched_off_are_left_out() -> None:
    spec = MultiCropSpec(
        **SMALL, jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0), blur_sigma=(0.1, 0.1)
    )
    names = [s[0] for s in _steps(MultiCropTransform(spec).global2)]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomSolarize", "ToDtype", "Normalize"]
    no_jitter = MultiCropSpec(**SMALL, jitter=(0.0, 0.0, 0.0, 0.0))
    assert "RandomApply" not in [s[0] for s in _steps(MultiCropTransform(no_jitter).global2)][:3]
    one_pixel_blur = MultiCropSpec(**SMALL, blur_sigma=(0.1, 0.3))  # kernel size 3: still a blur
    assert any(
        s[0] == "RandomApply" and s[2][1][0][0] == "SeparableGaussianBlur"
        for s in _steps(MultiCropTransform(one_pixel_blur).local)
    )


def test_gray_statistics_are_the_channel_means_of_imagenets() -> None:
    mean, std = MultiCropSpec(in_chans=1).stats
    assert mean == pytest.approx((0.449,)) and std == pytest.approx((0.226,))
    assert mean[0] == GRAY_MEAN and std[0] == GRAY_STD


def test_crop_sizes() -> None:
    assert MultiCropSpec(**SMALL).crop_sizes() == [32, 32, 16, 16]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"global_size": 1, "local_size": 1, "n_locals": 0},
        {"global_scale": (1e-6, 1.0), "local_scale": (1.0, 1.0), "blur_sigma": (1e-6, 1e-6)},
        {"jitter": (0.0, 0.0, 0.0, 0.5)},
        {"flip_prob": 1.0, "jitter_prob": 0.0, "grayscale_prob": 1.0, "solarize_prob": 0.0},
    ],
)
def test_limit_values_are_accepted(kwargs: dict[str, Any]) -> None:
    MultiCropSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_size": 0}, "global_size"),
        ({"local_size": 0}, "local_size"),
        ({"global_scale": (0.5, 1.5)}, "global_scale: must be a pair"),
        ({"global_scale": (0.8, 0.2)}, "global_scale: must be a pair"),
        ({"local_scale": (0.2, 1.5)}, "local_scale: must be a pair"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma: must be a pair"),
        ({"mean": (0.5,), "std": (0.2, 0.2, 0.2)}, "in_chans=3"),
        ({"jitter": (0.4, 0.4, 0.2)}, "jitter: must be"),
        ({"jitter": (0.4, -0.1, 0.2, 0.1)}, "jitter: must be"),
        ({"jitter": (0.4, 0.4, 0.2, 0.6)}, "jitter: must be"),
        ({"flip_prob": 1.5}, "flip_prob: must be in"),
        ({"jitter_prob": -0.5}, "jitter_prob: must be in"),
        ({"grayscale_prob": 1.5}, "grayscale_prob: must be in"),
        ({"solarize_prob": -0.5}, "solarize_prob: must be in"),
        ({"blur_probs": (1.0, 1.5, 0.5)}, r"blur_probs\[1\]: must be in"),
    ],
)
def test_bad_values_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiCropSpec(**kwargs)


def test_to_uint8_chw_channels() -> None:
    rgba = torch.randint(0, 256, (4, 6, 5), dtype=torch.uint8)
    assert torch.equal(to_uint8_chw(rgba, 3), rgba[:3])
    one_row = torch.randint(0, 256, (3, 1, 5), dtype=torch.uint8)
    assert to_uint8_chw(one_row, 1).shape == (1, 1, 5)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_chw(torch.zeros(5, 6, 5, dtype=torch.uint8), 3)


def test_multicrop_converts_to_the_specs_channels() -> None:
    crops = MultiCropTransform(MultiCropSpec(**SMALL, in_chans=1))(torch.zeros(3, 40, 40, dtype=torch.uint8))
    assert all(c.shape[0] == 1 for c in crops)


def test_eval_transform_recipe() -> None:
    t = EvalTransform(224)
    assert t.resize == 256
    assert _steps(t.pipeline) == [
        _describe(v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)),
        _describe(v2.CenterCrop(224)),
        _describe(v2.ToDtype(torch.float32, scale=True)),
        _describe(v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))),
    ]
    assert EvalTransform(1).resize == 1  # the smallest crop is accepted
    with pytest.raises(ValueError, match="in_chans=3"):
        EvalTransform(8, mean=(0.5,), std=(0.2, 0.2, 0.2))
    assert repr(t).startswith("EvalTransform(size=224, resize=256, in_chans=3")
    assert repr(MultiCropTransform(MultiCropSpec(**SMALL))).startswith("MultiCropTransform(MultiCropSpec(")


@pytest.mark.parametrize(("in_chans", "randaug_n"), [(3, 1), (1, 2)])
def test_supervised_train_recipe(in_chans: int, randaug_n: int) -> None:
    t = SupervisedTrainTransform(24, in_chans, randaug_n, 7, (0.3, 1.0))
    mean, std = MultiCropSpec(in_chans=in_chans).stats
    assert _steps(t.pipeline) == [
        _describe(v2.RandomResizedCrop(24, scale=(0.3, 1.0), antialias=True)),
        _describe(v2.RandomHorizontalFlip()),
        _describe(v2.RandAugment(num_ops=randaug_n, magnitude=7)),
        _describe(v2.ToDtype(torch.float32, scale=True)),
        _describe(v2.Normalize(list(mean), list(std))),
    ]
    flat = Image.new("RGB", (30, 30), (255, 0, 128))
    out = SupervisedTrainTransform(24, in_chans, 0, 7, (1.0, 1.0))(flat)
    assert out.shape == (in_chans, 24, 24)
    pixel = torch.tensor([255, 0, 128]) / 255 if in_chans == 3 else torch.tensor([0.2989 + 0.114 * 128 / 255])
    expected = (pixel - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out[:, 12, 12], expected.float(), atol=2e-2, rtol=0)


# --- the cheaper kernels against torchvision's ------------------------------------------------------------


def _photo(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """Smooth random colour fields (as ``sopvit.bench.synthetic_jpegs``), so crops and blurs see photo-like
    gradients rather than noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, size[1] // 10, size[0] // 10, generator=g) * 255
    big = torch.nn.functional.interpolate(small, size=(size[1], size[0]), mode="bilinear")[0]
    return Image.fromarray(big.round().byte().permute(1, 2, 0).numpy())


def _hue_test_images() -> list[torch.Tensor]:
    noise = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gray = noise[:1].expand(3, -1, -1).contiguous()
    # Every tie between the max channels (R = G, G = B, R = B, all three) and the primaries.
    ties = torch.tensor([[255, 255, 0], [0, 255, 255], [255, 0, 255], [9, 9, 9], [255, 0, 0], [0, 0, 255]])
    return [noise, gray, ties.T.to(torch.uint8).reshape(3, 1, 6), TF.pil_to_tensor(_photo(1))]


def _assert_levels_close(ours: torch.Tensor, theirs: torch.Tensor, max_diff: float, max_share: float) -> None:
    diff = (ours.double() - theirs.double()).abs()
    assert diff.max() <= max_diff
    assert (diff > 0.5).double().mean() <= max_share


@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize(
    ("kernel", "sigma"), [((13, 13), (0.1, 0.1)), ((13, 13), (2.0, 2.0)), ((3, 7), (0.7, 1.9))]
)
def test_separable_blur_matches_torchvisions(
    chans: int, kernel: tuple[int, int], sigma: tuple[float, ...]
) -> None:
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (chans, 30, 34), dtype=torch.uint8, generator=g)
    for img in [TF.pil_to_tensor(_photo(0))[:chans], noise]:
        ours = gaussian_blur_uint8(img, list(kernel), list(sigma))
        # The same float32 products summed in another order: only a sum within float error of a .5 rounds
        # the other way, by one level.
        _assert_levels_close(ours, TF.gaussian_blur(img, list(kernel), list(sigma)), 1, 1e-3)


@pytest.mark.parametrize("hue", [-0.5, -0.23, -0.004, 0.0, 0.1, 0.37, 0.5])
def test_fast_hue_matches_torchvisions(hue: float) -> None:
    for img in _hue_test_images():
        # The same HSV rotation in float32, rounded differently: one level, on a few pixels in 10^5.
        _assert_levels_close(adjust_hue_uint8(img, hue), TF.adjust_hue(img, hue), 1, 1e-3)
    gray = _hue_test_images()[1]
    assert torch.equal(adjust_hue_uint8(gray, hue), gray)


@pytest.mark.parametrize(
    "img", [_photo(2), TF.to_dtype(TF.pil_to_tensor(_photo(2)), torch.float32, scale=True)]
)
def test_inputs_other_than_uint8_tensors_get_torchvisions_kernels(img: Image.Image | torch.Tensor) -> None:
    pairs = [
        (FastHueColorJitter(0.4, 0.4, 0.2, 0.1), v2.ColorJitter(0.4, 0.4, 0.2, 0.1)),
        (SeparableGaussianBlur(5, sigma=(0.1, 2.0)), v2.GaussianBlur(5, sigma=(0.1, 2.0))),
    ]
    for ours, theirs in pairs:
        torch.manual_seed(3)
        a = ours(img)
        torch.manual_seed(3)
        b = theirs(img)
        assert type(a) is type(b)
        assert torch.equal(*(TF.pil_to_tensor(x) if isinstance(x, Image.Image) else x for x in (a, b)))


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every random parameter torchvision's transforms draw (crop boxes, jitter factors and order, blur
    sigmas), in order; what RandomApply, flips, grayscale and solarize draw shows in the RNG state after."""
    records: list[tuple[str, dict[str, Any]]] = []
    for cls in (v2.RandomResizedCrop, v2.ColorJitter, v2.GaussianBlur):

        def record(
            self: v2.Transform,
            flat_inputs: list[Any],
            _make: Any = cls.make_params,
            _name: str = cls.__name__,
        ) -> dict[str, Any]:
            params = _make(self, flat_inputs)
            plain = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
            records.append((_name, plain))
            return params

        monkeypatch.setattr(cls, "make_params", record)
    return records


def _views(transform: MultiCropTransform, img: Image.Image | torch.Tensor, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    crops = transform(img)
    return [*crops, torch.rand(8)]  # the RNG state after: equal only if as many draws were made


@pytest.mark.parametrize("in_chans", [1, 3])
def test_pil_and_tensor_inputs_draw_the_same_views(
    drawn: list[tuple[str, dict[str, Any]]], in_chans: int
) -> None:
    transform = MultiCropTransform(MultiCropSpec(**SMALL, in_chans=in_chans))
    for seed in range(3):
        pil = _photo(seed)
        from_pil = _views(transform, pil, seed)
        pil_draws = list(drawn)
        drawn.clear()
        from_tensor = _views(transform, TF.pil_to_tensor(pil.convert("RGB" if in_chans == 3 else "L")), seed)
        assert drawn == pil_draws and len(drawn) > 2 + SMALL["n_locals"]
        drawn.clear()
        # A PIL image becomes the same uint8 tensor before any step runs, so the views are identical.
        assert all(torch.equal(a, b) for a, b in zip(from_pil, from_tensor, strict=True))


def test_cheaper_kernels_draw_and_make_torchvisions_views(
    drawn: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = MultiCropSpec(**SMALL, jitter_prob=1.0, blur_probs=(1.0, 1.0, 1.0), solarize_prob=0.5)
    ours = MultiCropTransform(spec)
    monkeypatch.setattr(transforms_module, "FastHueColorJitter", v2.ColorJitter)
    monkeypatch.setattr(transforms_module, "SeparableGaussianBlur", v2.GaussianBlur)
    theirs = MultiCropTransform(spec)
    assert [type(s).__name__ for s in theirs.local.transforms[2].transforms] == ["ColorJitter"]
    mean, std = (torch.tensor(s).view(-1, 1, 1) for s in spec.stats)
    ours_levels, theirs_levels = [], []
    for seed in range(4):
        img = _photo(10 + seed)
        a = _views(ours, img, seed)
        our_draws = list(drawn)
        drawn.clear()
        b = _views(theirs, img, seed)
        assert drawn == our_draws and {"ColorJitter", "GaussianBlur"} <= {name for name, _ in drawn}
        drawn.clear()
        assert torch.equal(a[-1], b[-1])
        ours_levels += [((x * std + mean) * 255).flatten() for x in a[:-1]]
        theirs_levels += [((y * std + mean) * 255).flatten() for y in b[:-1]]
    # Hue and blur are each at most one level off torchvision's, on a few pixels in 10^4 or fewer; the jitter
    # steps after them scale a difference by at most 1.4 (brightness, contrast) and 1.2 (saturation) before
    # truncating: at most 4 levels, on a few pixels in 10^4 at most.
    _assert_levels_close(torch.cat(ours_levels), torch.cat(theirs_levels), 4, 1e-3)
