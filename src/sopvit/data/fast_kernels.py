"""Cheaper CPU kernels for torchvision's blur and hue, used inside torchvision's own transforms.

The per-sample path's cost was these two kernels (issue 12's profile): torchvision's 2-D blur convolution
and its HSV hue shift, whose ``aminmax``/``where``/``remainder`` are unvectorised on the CPU. The
transforms below keep torchvision's random draws and swap only the kernel; ``blur_axis`` is also the
device path's blur (``photometric``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "FastHueColorJitter",
    "SeparableGaussianBlur",
    "adjust_hue_uint8",
    "blur_axis",
    "gaussian_blur_uint8",
    "gaussian_weights",
]

_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def gaussian_weights(kernel_size: int, sigma: Tensor) -> Tensor:
    """torchvision's 1-D blur kernels ``(n, kernel_size)`` for sigmas ``(n,)``: ``exp(-x^2 / (2 sigma^2))``
    at the integer offsets, normalised."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=sigma.device, dtype=sigma.dtype)
    return torch.softmax(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2, dim=1)


def blur_axis(x: Tensor, weights: Tensor, dim: int) -> Tensor:
    """``x`` ``(n, C, H, W)`` reflect-padded along ``dim`` (-1 or -2) and correlated there with each
    image's 1-D kernel, ``weights`` ``(n, k)``.

    One multiply-add of a shifted view per tap: cheaper on the CPU than torch's depthwise conv2d, and
    element by element, so an image's result cannot depend on which other images share its batch (a
    batched matmul or grouped convolution picks its BLAS/oneDNN kernel by batch size).
    """
    half, length = weights.shape[1] // 2, x.shape[dim]
    padded = F.pad(x, [half, half, 0, 0] if dim == -1 else [0, 0, half, half], mode="reflect")
    taps = weights[:, :, None, None, None]
    out = padded.narrow(dim, 0, length) * taps[:, 0]
    for i in range(1, weights.shape[1]):
        out.addcmul_(padded.narrow(dim, i, length), taps[:, i])
    return out


def gaussian_blur_uint8(img: Tensor, kernel_size: list[int], sigma: list[float]) -> Tensor:
    """torchvision's ``gaussian_blur`` of a uint8 ``(C, H, W)`` tensor, as two 1-D passes.

    The 2-D kernel torchvision convolves with is the outer product of the two 1-D ones, so this is the same
    reflect-padded blur in float32, summed in another order: outputs differ from torchvision's by at most
    one level, on the few pixels in 10^5 whose value falls within float error of a rounding boundary.
    The 2-D conv costs ``kx * ky`` multiply-adds per pixel, this ``kx + ky``.
    """
    kx, ky = kernel_size
    x = blur_axis(img.float()[None], gaussian_weights(kx, torch.tensor([sigma[0]])), dim=-1)
    x = blur_axis(x, gaussian_weights(ky, torch.tensor([sigma[1]])), dim=-2)
    return x[0].round_().to(torch.uint8)


def adjust_hue_uint8(img: Tensor, hue_factor: float) -> Tensor:
    """torchvision's ``adjust_hue`` of a uint8 RGB ``(3, H, W)`` tensor, in cheaper tensor operations.

    Rotating the hue keeps each pixel's max (V) and chroma ``c = max - min``; with ``h`` the rotated hue in
    sixths of a turn, the closed form of HSV -> RGB gives channel ``n`` (5, 3, 1 for R, G, B) as
    ``min + c * clamp(|k - 2| - 1, 0, 1)``, ``k = (n + h) mod 6``. torchvision instead stacks H, S, V planes
    and gathers, and its ``aminmax``, ``where`` and ``remainder`` are unvectorised on the CPU; this uses
    ``maximum``/``minimum``, ``lerp`` with 0/1 weights and ``floor``. Same float32 values up to rounding and
    the same float -> uint8 conversion: outputs differ from torchvision's by at most one level, on a few
    pixels in 10^5.
    """
    x = img.float()
    r, g, b = x.unbind(0)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # The pixels are integers, so min(max - channel, 1) is exactly 0 where that channel is the max, else 1.
    not_r = (maxc - r).clamp_(max=1.0)
    not_g = (maxc - g).clamp_(max=1.0)
    # Hue in sixths of a turn from the max channel, tried in torchvision's (Pillow's) order R, G, B.
    sixths = torch.lerp(torch.add(b - r, chroma, alpha=2.0), torch.add(r - g, chroma, alpha=4.0), not_g)
    sixths = torch.lerp(g - b, sixths, not_r)
    # chroma is 0 (a gray pixel, numerator 0 too) or >= 1: clamping it to 1 only avoids 0 / 0.
    sixths.div_(chroma.clamp(min=1.0)).add_(6.0 * hue_factor)
    sixths.sub_(torch.floor(sixths * (1.0 / 6.0)).mul_(6.0))
    k = torch.add(_HUE_OFFSETS, sixths)  # in [1, 11): one wrap, hence the distance to 2 or to 8 = 2 + 6
    weight = torch.minimum((k - 2.0).abs_(), (k - 8.0).abs_()).sub_(1.0).clamp_(0.0, 1.0)
    out = torch.addcmul(minc, weight, chroma)
    # torchvision's float -> uint8 conversion of out / 255: scale by 256 - 1e-3 and truncate.
    return out.mul_((256.0 - 1e-3) / 255.0).to(torch.uint8)


def _is_uint8_image(inpt: object, channels: tuple[int, ...]) -> bool:
    return type(inpt) is Tensor and inpt.dtype == torch.uint8 and inpt.ndim == 3 and inpt.shape[0] in channels


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` (the same sigma draw) that blurs uint8 ``(C, H, W)`` tensors with
    :func:`gaussian_blur_uint8`, 3-4x cheaper on the CPU; other inputs get torchvision's kernel."""

    def _call_kernel(
        self, functional: Callable[..., object], inpt: object, *args: object, **kwargs: object
    ) -> object:
        if functional is TF.gaussian_blur and _is_uint8_image(inpt, (1, 3)):
            (kernel_size,), sigma = args, cast(list[float], kwargs["sigma"])
            return gaussian_blur_uint8(cast(Tensor, inpt), cast(list[int], kernel_size), sigma)
        return super()._call_kernel(functional, inpt, *args, **kwargs)


class FastHueColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` (the same factors and order) whose hue step on uint8 RGB tensors is
    :func:`adjust_hue_uint8`, about 4x cheaper on the CPU than torchvision's; other steps and inputs get
    torchvision's kernels."""

    def _call_kernel(
        self, functional: Callable[..., object], inpt: object, *args: object, **kwargs: object
    ) -> object:
        if functional is TF.adjust_hue and _is_uint8_image(inpt, (3,)):
            return adjust_hue_uint8(cast(Tensor, inpt), cast(float, kwargs["hue_factor"]))
        return super()._call_kernel(functional, inpt, *args, **kwargs)
