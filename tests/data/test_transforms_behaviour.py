"""Per-sample transforms pinned to the iBOT / DINO recipes: the steps built, their settings, validation."""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sopvit.data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropSpec, MultiCropTransform
from sopvit.data.transforms import SupervisedTrainTransform, to_uint8_chw

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
    jitter = _describe(v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8))
    blur = _describe(v2.GaussianBlur(13, sigma=(0.1, 2.0)))
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
    blur = _describe(v2.GaussianBlur(13, sigma=(0.1, 2.0)))
    assert _steps(t.local) == expected(16, (0.05, 0.4), 0.5, solarize=False)


def test_gray_multicrop_recipe_drops_colour_steps() -> None:
    spec = MultiCropSpec(**SMALL, in_chans=1, blur_probs=(0.0, 0.5, 0.5), solarize_prob=0.0)
    t = MultiCropTransform(spec)
    assert _steps(t.global1) == [
        _crop(32, (0.32, 1.0)),
        _describe(v2.RandomHorizontalFlip(0.5)),
        _describe(v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.0, 0.0)], p=0.8)),
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
        s[0] == "RandomApply" and s[2][1][0][0] == "GaussianBlur"
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
