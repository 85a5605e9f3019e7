"""Transforms of evaluation and supervised fine-tuning (not pre-training's multi-crop): resize and centre
crop for features, and BEiT's fine-tuning augmentation (timm RandAugment, random erasing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from PIL import Image
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sopvit.data.transforms import default_stats, to_uint8_chw

__all__ = ["INTERPOLATIONS", "EvalTransform", "SupervisedTrainTransform", "TimmRandAugment"]


INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


class EvalTransform:
    """Deterministic resize + centre crop + normalise for k-NN / linear probing / feature export.

    ``__call__(img PIL or uint8 (C, H, W)) -> float32 (in_chans, size, size)``. ``resize``
    (shorter side) defaults to ``round(size * 256 / 224)``, the standard ImageNet ratio; ``interpolation``
    is that resize's ('bicubic' as DINO's evaluations, 'bilinear' as BEiT's fine-tuning evaluation).
    """

    def __init__(
        self,
        size: int,
        resize: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        in_chans: int = 3,
        interpolation: str = "bicubic",
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        resize = round(size * 256 / 224) if resize is None else resize
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= size ({size})")
        default_mean, default_std = default_stats(in_chans)
        mean = default_mean if mean is None else tuple(mean)
        std = default_std if std is None else tuple(std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std must have in_chans={in_chans} entries, got {mean}, {std}")
        self.size, self.resize, self.in_chans = size, resize, in_chans
        self.interpolation = _interpolation(interpolation)
        self.pipeline = v2.Compose(
            [
                v2.Resize(resize, interpolation=self.interpolation, antialias=True),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
        )

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        return self.pipeline(to_uint8_chw(img, self.in_chans))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, resize={self.resize}, in_chans={self.in_chans}, "
            f"interpolation={self.interpolation.value})"
        )


def _posterize(img: Image.Image, bits: int, **kwargs: object) -> Image.Image:
    """timm's posterize, keeping 0 bits as the Pillow of the reference code did (a black image).

    timm's 'PosterizeIncreasing' keeps 4 - int(magnitude / 10 * 4) bits: 0 at magnitude 10, which a
    'mstd0.5' draw around 9 reaches (clipped to 10) in about 2% of its calls; recent Pillow (13 here)
    refuses 0 bits, which would stop a fine-tuning run within its first epoch.
    """
    return Image.new(img.mode, img.size) if bits <= 0 else cast(Image.Image, timm_posterize(img, bits))


class TimmRandAugment:
    """timm's RandAugment, built from a timm config string, applied to a uint8 ``(C, H, W)`` tensor.

    timm's ops work on PIL images: the tensor goes to PIL ('L' or 'RGB') and back. The hyper-parameters are
    those ``timm.data.create_transform`` gives it: translations up to 45% of ``size``, the normalisation mean
    (in [0, 255]) as the fill colour, and the crop's interpolation for the geometric ops. Its random draws
    come from Python's ``random`` and numpy's global RNGs.
    """

    def __init__(
        self, config: str, size: int, mean: tuple[float, ...], interpolation: str = "bicubic"
    ) -> None:
        if not isinstance(config, str) or config.split("-")[0] != "rand":
            raise ValueError(
                f"auto_augment: not a timm RandAugment string ('rand-m9-mstd0.5-inc1'): {config!r}"
            )
        _interpolation(interpolation)
        self.config = config
        self.hparams = {
            "translate_const": int(size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            "interpolation": str_to_pil_interp(interpolation),
        }
        try:
            self.augment = rand_augment_transform(config, dict(self.hparams))
        except (AssertionError, ValueError, KeyError) as exc:
            raise ValueError(
                f"auto_augment: timm cannot parse {config!r} ({exc or type(exc).__name__})"
            ) from exc
        for op in self.augment.ops:
            if op.aug_fn is timm_posterize:
                op.aug_fn = _posterize

    def __call__(self, x: Tensor) -> Tensor:
        return TF.pil_to_tensor(self.augment(TF.to_pil_image(x)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class SupervisedTrainTransform:
    """Supervised training views (fine-tuning, augmented linear probe), as timm's ``create_transform`` orders
    them: random resized crop + flip + RandAugment on uint8, then float + normalise, then random erasing.

    RandAugment runs on uint8 before normalisation because its photometric ops (posterize, solarize,
    equalize) are defined on [0, 255] pixels: either torchvision's (``randaug_n`` ops of magnitude
    ``randaug_m``) or timm's from a config string (``auto_augment``, e.g. ``'rand-m9-mstd0.5-inc1'``; one of
    the two). ``reprob`` > 0 appends timm's ``RandomErasing`` (one box, per-pixel normal noise: BEiT's
    'pixel' mode, count 1) on the normalised tensor. ``interpolation`` is the crop's resize.
    ``__call__(PIL or uint8 (C, H, W)) -> float (C, size, size)``.
    """

    def __init__(
        self,
        size: int,
        in_chans: int,
        randaug_n: int = 0,
        randaug_m: int = 9,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        *,
        auto_augment: str | None = None,
        reprob: float = 0.0,
        interpolation: str = "bilinear",
    ) -> None:
        if randaug_n > 0 and auto_augment is not None:
            raise ValueError("randaug_n and auto_augment both ask for RandAugment; set one of them")
        if not 0.0 <= reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {reprob}")
        self.in_chans = in_chans
        mean, std = default_stats(in_chans)
        steps: list[Callable[[Tensor], Tensor]] = [
            v2.RandomResizedCrop(
                size, scale=crop_scale, interpolation=_interpolation(interpolation), antialias=True
            ),
            v2.RandomHorizontalFlip(),
        ]
        if randaug_n > 0:
            steps.append(v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m))
        if auto_augment is not None:
            steps.append(TimmRandAugment(auto_augment, size, mean, interpolation))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        if reprob > 0:
            steps.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
        self.pipeline = v2.Compose(steps)

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        return cast(Tensor, self.pipeline(to_uint8_chw(img, self.in_chans)))
