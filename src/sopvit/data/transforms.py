"""Per-sample iBOT multi-crop augmentation of pre-training (torchvision.transforms.v2); evaluation and
fine-tuning transforms are in eval_transforms.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sopvit.config.coerce import ConfigError
from sopvit.data.fast_kernels import FastHueColorJitter, SeparableGaussianBlur

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropSpec",
    "MultiCropTransform",
    "blur_kernel_size",
    "to_uint8_chw",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def default_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    # Grayscale conversion averages the channels, so the channel-mean of the ImageNet stats is
    # the natural single-channel default.
    return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ConfigError(f"must be a pair with {lo} <= lo <= hi <= {hi}, got {value!r}", name)


@dataclass(frozen=True)
class MultiCropSpec:
    """Geometry and photometric settings of iBOT multi-crop augmentation.

    Crops are returned as ``[global1, global2, local1, ..., localL]``. Global 1 is always
    blurred, global 2 is rarely blurred and may be solarized (BYOL's asymmetric recipe).
    ``mean``/``std`` default to ImageNet statistics (their channel average when ``in_chans=1``).
    ``jitter`` is (brightness, contrast, saturation, hue); saturation, hue and random grayscale
    are skipped for single-channel output. ``blur_probs`` is (global1, global2, locals).
    """

    global_size: int = 224
    local_size: int = 96
    n_locals: int = 10
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    in_chans: int = 3
    flip_prob: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2

    def __post_init__(self) -> None:
        """Raises ConfigError keyed by the field, so pre-training configs report it as ``data.<field>``."""
        if self.in_chans not in (1, 3):
            raise ConfigError(f"must be 1 (grayscale) or 3 (RGB), got {self.in_chans}", "in_chans")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)
        if self.n_locals < 0:
            raise ConfigError(f"must be >= 0, got {self.n_locals}", "n_locals")
        _check_range("global_scale", self.global_scale, 1e-6, 1.0)
        _check_range("local_scale", self.local_scale, 1e-6, 1.0)
        _check_range("blur_sigma", self.blur_sigma, 1e-6, math.inf)
        mean, std = self.stats
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ConfigError(f"mean and std must have in_chans={self.in_chans} entries, got {mean}, {std}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"entries must be > 0, got {std}", "std")
        if len(self.jitter) != 4 or any(j < 0 for j in self.jitter) or self.jitter[3] > 0.5:
            raise ConfigError(f"must be 4 non-negative values with hue <= 0.5, got {self.jitter}", "jitter")
        if len(self.blur_probs) != 3:
            raise ConfigError(f"must be (global1, global2, locals), got {self.blur_probs}", "blur_probs")
        probs = {"flip_prob": self.flip_prob, "jitter_prob": self.jitter_prob}
        probs |= {"grayscale_prob": self.grayscale_prob, "solarize_prob": self.solarize_prob}
        probs |= {f"blur_probs[{i}]": p for i, p in enumerate(self.blur_probs)}
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"must be in [0, 1], got {p}", name)

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Resolved ``(mean, std)``, each with ``in_chans`` entries."""
        default_mean, default_std = default_stats(self.in_chans)
        mean = default_mean if self.mean is None else tuple(self.mean)
        std = default_std if self.std is None else tuple(self.std)
        return mean, std

    @property
    def n_crops(self) -> int:
        return 2 + self.n_locals

    def crop_sizes(self) -> list[int]:
        return [self.global_size] * 2 + [self.local_size] * self.n_locals


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """Odd Gaussian kernel size covering +-3 sigma, capped so reflect padding fits the crop."""
    size = 2 * math.ceil(3 * sigma_max) + 1
    cap = max(1, 2 * (crop_size // 2) - 1)
    return max(1, min(size, cap))


def to_uint8_chw(img: Image.Image | Tensor, in_chans: int) -> Tensor:
    """PIL image or uint8 tensor ``(C, H, W)`` / ``(H, W)`` -> uint8 tensor ``(in_chans, H, W)``."""
    if isinstance(img, Image.Image):
        img = img.convert("RGB" if in_chans == 3 else "L")
        return TF.pil_to_tensor(img)
    if not isinstance(img, Tensor):
        raise TypeError(f"img must be a PIL image or a uint8 tensor, got {type(img).__name__}")
    if img.dtype != torch.uint8:
        raise TypeError(f"img tensor must be uint8, got {img.dtype}")
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3 or img.shape[0] not in (1, 3, 4):
        raise ValueError(f"img tensor must have shape (C, H, W) with C in 1, 3, 4, got {tuple(img.shape)}")
    img = img[:3]
    if img.shape[0] == in_chans:
        return img
    if in_chans == 3:
        return img.expand(3, -1, -1).contiguous()
    return TF.rgb_to_grayscale(img, num_output_channels=1)


class MultiCropTransform:
    """Per-image iBOT multi-crop: ``__call__(img) -> [global1, global2, local1..localL]``.

    Input: PIL image (any mode) or uint8 tensor ``(C, H, W)``. Output: float32 tensors
    ``(in_chans, global_size, global_size)`` twice, then ``(in_chans, local_size, local_size)``
    ``n_locals`` times, normalised with ``spec.stats``. Randomness comes from torch's global RNG,
    which DataLoader seeds differently in every worker. Every parameter is drawn by torchvision's v2
    transforms; the blur and the hue shift, most of the cost, run cheaper kernels that give torchvision's
    pixels to within one level (:class:`SeparableGaussianBlur`, :class:`FastHueColorJitter`).
    """

    def __init__(self, spec: MultiCropSpec) -> None:
        self.spec = spec
        blur_g1, blur_g2, blur_local = spec.blur_probs
        self.global1 = self._pipeline(spec.global_size, spec.global_scale, blur_g1, solarize=False)
        self.global2 = self._pipeline(spec.global_size, spec.global_scale, blur_g2, solarize=True)
        self.local = self._pipeline(spec.local_size, spec.local_scale, blur_local, solarize=False)

    def _pipeline(self, size: int, scale: tuple[float, float], blur_p: float, solarize: bool) -> v2.Compose:
        spec = self.spec
        brightness, contrast, saturation, hue = spec.jitter
        if spec.in_chans == 1:
            saturation, hue = 0.0, 0.0
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(
                size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(spec.flip_prob),
        ]
        if any((brightness, contrast, saturation, hue)) and spec.jitter_prob > 0:
            jitter = FastHueColorJitter(brightness, contrast, saturation, hue)
            steps.append(v2.RandomApply([jitter], p=spec.jitter_prob))
        if spec.in_chans == 3 and spec.grayscale_prob > 0:
            steps.append(v2.RandomGrayscale(spec.grayscale_prob))
        kernel = blur_kernel_size(spec.blur_sigma[1], size)
        if blur_p > 0 and kernel > 1:
            blur = SeparableGaussianBlur(kernel, sigma=spec.blur_sigma)
            steps.append(v2.RandomApply([blur], p=blur_p))
        if solarize and spec.solarize_prob > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=spec.solarize_prob))
        mean, std = spec.stats
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        return v2.Compose(steps)

    def __call__(self, img: Image.Image | Tensor) -> list[Tensor]:
        # PIL images become a tensor first, not last: torch's uint8 antialiased resize is about 3x faster
        # than Pillow's here, torchvision blurs PIL images through a tensor anyway, and its PIL hue shift
        # quantises H, S and V to 8 bits.
        x = to_uint8_chw(img, self.spec.in_chans)
        crops = [self.global1(x), self.global2(x)]
        crops += [self.local(x) for _ in range(self.spec.n_locals)]
        return crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"
