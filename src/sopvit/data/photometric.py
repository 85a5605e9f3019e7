"""iBOT's photometric ops on whole batches of crops, each image with its own drawn parameters.

The ops are torchvision's tensor kernels in batched form: brightness, contrast and saturation blend as
``adjust_*`` do, hue is torchvision's HSV shift (its own HSV conversion), the blur is its Gaussian kernel
with reflect padding, solarize inverts values >= 128/255. The jitter applies its four ops in each image's
own random order, as ``ColorJitter`` does. The per-sample path works on uint8 and rounds after every op;
here the crops stay float in [0, 1] throughout (no rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from sopvit.data.crop_params import CropParams
from sopvit.data.fast_kernels import blur_axis, gaussian_weights
from sopvit.data.transforms import MultiCropSpec, blur_kernel_size

__all__ = ["apply_photometric", "gray"]

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on uint8


def gray(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, 1, H, W)`` luminance (identity for C == 1)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor[:, None, None, None] * (x - other) + other).clamp_(0.0, 1.0)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f[:, None, None, None]).clamp_(0.0, 1.0)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, gray(x), f)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """``f``: the hue shift in turns, in [-0.5, 0.5]."""
    h, s, v = _rgb_to_hsv(x).unbind(1)
    h = (h + f[:, None, None]).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=1))


_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (_brightness, _contrast, _saturation, _hue)


def _on_subset(x: Tensor, selected: Tensor, op: Callable[[Tensor], Tensor]) -> Tensor:
    """``op`` applied to the images where the CPU bool ``selected`` ``(B,)`` holds; the others unchanged."""
    idx = selected.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return op(x)
    idx = idx.to(x.device, non_blocking=True)
    return x.index_copy(0, idx, op(x.index_select(0, idx)))


def _with_factor(op: Callable[[Tensor, Tensor], Tensor], factor: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda sub: op(sub, factor)


def _jitter(x: Tensor, p: CropParams, spec: MultiCropSpec) -> Tensor:
    active = [strength > 0 for strength in spec.jitter]
    if x.shape[1] == 1:  # saturation and hue leave gray images unchanged
        active[2] = active[3] = False
    for slot in range(4):
        for op in (o for o in range(4) if active[o]):
            selected = p.jitter & (p.order[:, slot] == op)
            factor = p.factors[selected, op].to(x.device, x.dtype, non_blocking=True)
            x = _on_subset(x, selected, _with_factor(_JITTER_OPS[op], factor))
    return x


def _blur(x: Tensor, p: CropParams, spec: MultiCropSpec) -> Tensor:
    """GaussianBlur with each selected image's sigma: torchvision's kernel over integer offsets."""
    height, width = x.shape[-2:]
    kernel = blur_kernel_size(spec.blur_sigma[1], min(height, width))
    if kernel <= 1:
        return x

    def blur(sub: Tensor) -> Tensor:
        weights = gaussian_weights(kernel, p.sigma[p.blur].to(sub.device, sub.dtype, non_blocking=True))
        return blur_axis(blur_axis(sub, weights, -1), weights, -2)

    return _on_subset(x, p.blur, blur)


def apply_photometric(x: Tensor, p: CropParams, spec: MultiCropSpec) -> Tensor:
    """Flip, colour jitter, grayscale, blur and solarize as the per-sample pipeline orders them.

    ``x``: float ``(n, C, s, s)`` crops in [0, 1] (C = 1 or 3) with their ``CropParams`` (n images,
    on the CPU). Returns the crops normalised with ``spec.stats``, with ``spec.in_chans`` channels.
    """
    dev = x.device
    x = torch.where(p.flip.to(dev, non_blocking=True)[:, None, None, None], x.flip(-1), x)
    x = _jitter(x, p, spec)
    if x.shape[1] == 3:
        x = _on_subset(x, p.gray, lambda sub: gray(sub).expand_as(sub))
    x = _blur(x, p, spec)
    solarize = p.solarize.to(dev, non_blocking=True)[:, None, None, None]
    x = torch.where(solarize & (x >= _SOLARIZE_THRESHOLD), 1.0 - x, x)
    if x.shape[1] != spec.in_chans:
        x = x.expand(-1, spec.in_chans, -1, -1)
    mean, std = (torch.tensor(v, device=dev, dtype=x.dtype).view(1, -1, 1, 1) for v in spec.stats)
    return (x - mean) / std
