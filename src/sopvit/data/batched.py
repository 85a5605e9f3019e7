"""Vectorised multi-crop augmentation of whole uint8 batches (CPU or GPU), for in-memory datasets.

The per-sample path (``MultiCropTransform`` in DataLoader workers) costs milliseconds per image;
for 28-32 px data sets that dominates a small ViT's step time. Here every random parameter is
drawn per sample as a tensor and applied with batched ops, so one call processes the batch.
Differences from the per-sample path: colour-jitter operations run in a fixed order
(brightness, contrast, saturation, hue) instead of a random one, hue is a YIQ rotation instead of
an HSV shift, and crops are resampled bilinearly by ``roi_align`` (area-averaged when shrinking)
instead of bicubically.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from sopvit.data.transforms import MultiCropSpec, blur_kernel_size

__all__ = ["BatchMultiCrop"]

# RGB -> YIQ; hue rotation is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Above this crop size the O(size^3) banded-matmul blur loses to a depthwise convolution.
_MATMUL_BLUR_MAX_SIZE = 64


def _gray(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, 1, H, W)`` luminance (identity for C == 1)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor[:, None, None, None] * (x - other) + other).clamp_(0.0, 1.0)


class BatchMultiCrop:
    """Batched iBOT multi-crop: ``__call__(images, generator) -> [global1, global2, locals...]``.

    Args:
        spec: the same ``MultiCropSpec`` as the per-sample path.
        sampling_ratio: ``roi_align`` samples per output bin and axis; 0 (default) adapts it to
            ``ceil(crop side / output side)`` per crop, i.e. area-averages (anti-aliases) crops that
            are shrunk and samples once per pixel for crops that are enlarged.

    ``images``: uint8 ``(B, C, H, W)`` or float ``(B, C, H, W)`` in [0, 1], C in {1, 3}, on any
    device. Output: float32 ``(B, in_chans, s, s)`` per crop (``s`` = global then local size),
    normalised, on the images' device. Random parameters are drawn with ``generator`` on its
    device (so a seeded CPU generator gives the same crops for CPU and GPU batches), or from
    torch's global RNG on the images' device when it is None (no host-to-device copies).
    """

    def __init__(self, spec: MultiCropSpec, sampling_ratio: int = 0) -> None:
        if sampling_ratio < 0:
            raise ValueError(f"sampling_ratio must be >= 0, got {sampling_ratio}")
        self.spec = spec
        self.sampling_ratio = sampling_ratio
        mean, std = spec.stats
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        x = self._to_float(images)
        spec = self.spec
        blur_g1, blur_g2, blur_local = spec.blur_probs
        plan = [(spec.global_size, spec.global_scale, blur_g1, 0.0)]
        plan.append((spec.global_size, spec.global_scale, blur_g2, spec.solarize_prob))
        plan += [(spec.local_size, spec.local_scale, blur_local, 0.0)] * spec.n_locals
        return [self._crop(x, size, scale, blur, sol, generator) for size, scale, blur, sol in plan]

    def _to_float(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, C, H, W) with C in 1, 3, got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float().div_(255.0)
        elif images.is_floating_point():
            x = images.float()
        else:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        # Single-channel work is 3x cheaper and saturation/hue/grayscale are no-ops on gray
        # images, so RGB expansion of grayscale input is deferred to the very end.
        if self.spec.in_chans == 1 and x.shape[1] == 3:
            x = _gray(x)
        return x

    def _rand(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        rng_device = generator.device if generator is not None else device
        return torch.rand(n, generator=generator, device=rng_device).to(device)

    def _boxes(
        self,
        n: int,
        height: int,
        width: int,
        scale: tuple[float, float],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """RandomResizedCrop boxes ``(n, 5)`` = (batch index, x1, y1, x2, y2) in pixel units."""
        tries = 10
        device = device if generator is None else generator.device
        u = torch.rand(n, tries, 4, generator=generator, device=device, dtype=torch.float64)
        area = height * width * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
        log_r = math.log(3 / 4) + u[..., 1] * (math.log(4 / 3) - math.log(3 / 4))
        w = torch.sqrt(area * torch.exp(log_r))
        h = torch.sqrt(area / torch.exp(log_r))
        valid = (w <= width) & (h <= height)
        # First valid try per sample, as torchvision does; samples with none use the whole image.
        first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
        any_valid = valid.any(dim=1)

        def pick(t: Tensor) -> Tensor:
            return t.gather(1, first).squeeze(1)

        w = torch.where(any_valid, pick(w), float(width))
        h = torch.where(any_valid, pick(h), float(height))
        x1 = pick(u[..., 2]) * (width - w)
        y1 = pick(u[..., 3]) * (height - h)
        idx = torch.arange(n, dtype=torch.float64, device=device)
        return torch.stack([idx, x1, y1, x1 + w, y1 + h], dim=1)

    def _crop(
        self,
        x: Tensor,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        spec = self.spec
        n, _, height, width = x.shape
        dev = x.device
        boxes = self._boxes(n, height, width, scale, generator, dev).to(device=dev, dtype=x.dtype)
        out = roi_align(x, boxes, (size, size), 1.0, self.sampling_ratio, aligned=True)
        flip = self._rand(n, generator, dev) < spec.flip_prob
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        out = self._jitter(out, generator)
        if blur_p > 0:
            out = self._blur(out, blur_p, generator)
        if solarize_p > 0:
            sol = (self._rand(n, generator, dev) < solarize_p)[:, None, None, None]
            out = torch.where(sol & (out >= 128 / 255), 1.0 - out, out)
        if out.shape[1] != spec.in_chans:
            out = out.expand(-1, spec.in_chans, -1, -1)
        return (out - self._mean.to(dev)) / self._std.to(dev)

    def _jitter(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        spec = self.spec
        n, dev = x.shape[0], x.device
        brightness, contrast, saturation, hue = spec.jitter
        apply = (self._rand(n, generator, dev) < spec.jitter_prob).to(x.dtype)

        def factor(strength: float) -> Tensor:
            f = 1.0 + strength * (2.0 * self._rand(n, generator, dev) - 1.0)
            return 1.0 + apply * (f - 1.0)

        if brightness > 0:
            x = (x * factor(brightness)[:, None, None, None]).clamp_(0.0, 1.0)
        if contrast > 0:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = _blend(x, mean, factor(contrast))
        if x.shape[1] == 3:
            if saturation > 0:
                x = _blend(x, _gray(x), factor(saturation))
            if hue > 0:
                theta = apply * hue * (2.0 * self._rand(n, generator, dev) - 1.0) * 2.0 * math.pi
                x = self._rotate_hue(x, theta)
            if spec.grayscale_prob > 0:
                gray = (self._rand(n, generator, dev) < spec.grayscale_prob)[:, None, None, None]
                x = torch.where(gray, _gray(x).expand_as(x), x)
        return x

    @staticmethod
    def _rotate_hue(x: Tensor, theta: Tensor) -> Tensor:
        """Rotates chroma by ``theta`` radians per sample: ``(B, 3, H, W)``, ``(B,)``."""
        to_yiq = _RGB_TO_YIQ.to(device=x.device, dtype=x.dtype)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        matrix = torch.linalg.inv(to_yiq) @ rot @ to_yiq
        return torch.einsum("bij,bjhw->bihw", matrix, x).clamp_(0.0, 1.0)

    def _blur(self, x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
        """Gaussian blur with a per-sample sigma on the samples selected with probability ``p``."""
        n, _, height, width = x.shape
        dev = x.device
        kernel = blur_kernel_size(self.spec.blur_sigma[1], min(height, width))
        selected = self._rand(n, generator, dev) < p
        lo, hi = self.spec.blur_sigma
        sigma = lo + self._rand(n, generator, dev) * (hi - lo)
        idx = selected.nonzero().squeeze(1)
        if kernel <= 1 or idx.numel() == 0:
            return x
        half = kernel // 2
        offsets = torch.arange(-half, half + 1, device=dev, dtype=x.dtype)
        weights = torch.exp(-0.5 * (offsets[None, :] / sigma[idx, None]) ** 2)
        weights = weights / weights.sum(dim=1, keepdim=True)
        sub = x.index_select(0, idx)
        if max(height, width) <= _MATMUL_BLUR_MAX_SIZE:
            rows = _blur_matrix(weights, height)[:, None]
            cols = _blur_matrix(weights, width)[:, None]
            sub = rows @ sub @ cols.transpose(-1, -2)
        else:
            sub = _blur_conv(sub, weights)
        return x.index_copy(0, idx, sub)


def _blur_matrix(weights: Tensor, size: int) -> Tensor:
    """Per-sample 1-D blur as a ``(n, size, size)`` matrix with reflect padding folded in.

    For small crops a batched matmul with this banded matrix beats a grouped convolution, whose
    oneDNN primitive is rebuilt for every new group count (the number of blurred samples varies).
    """
    n, kernel = weights.shape
    half = kernel // 2
    taps = torch.arange(-half, half + 1, device=weights.device)
    src = (torch.arange(size, device=weights.device)[:, None] + taps).abs()
    src = torch.where(src >= size, 2 * (size - 1) - src, src)
    matrix = torch.zeros(n, size, size, device=weights.device, dtype=weights.dtype)
    return matrix.scatter_add_(2, src.expand(n, -1, -1), weights[:, None, :].expand(-1, size, -1))


def _blur_conv(x: Tensor, weights: Tensor) -> Tensor:
    """Separable depthwise blur of ``(n, C, H, W)`` with per-sample 1-D kernels ``(n, k)``."""
    n, chans, height, width = x.shape
    kernel = weights.shape[1]
    half = kernel // 2
    groups = n * chans
    per_channel = weights.repeat_interleave(chans, dim=0)
    out = F.pad(x.reshape(1, groups, height, width), (half, half, half, half), mode="reflect")
    out = F.conv2d(out, per_channel.view(groups, 1, 1, kernel), groups=groups)
    out = F.conv2d(out, per_channel.view(groups, 1, kernel, 1), groups=groups)
    return out.view(n, chans, height, width)
