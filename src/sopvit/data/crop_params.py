"""The random parameters of iBOT multi-crop for a whole batch, drawn as torchvision's transforms draw them.

Every parameter follows the distribution of the per-sample path's torchvision v2 transform (the rule is
cited at each draw), from counter-based uniforms keyed by (seed, epoch, image): see ``counter_rng``. The
parameters are tiny tensors computed on the CPU; only the pixel work runs on the training device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sopvit.data.counter_rng import uniforms
from sopvit.data.transforms import MultiCropSpec

__all__ = ["RRC_RATIO", "UNIFORMS_PER_CROP", "CropParams", "resized_crop_boxes", "sample_crop_params"]

RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range, as the per-sample path uses
_TRIES = 10  # RandomResizedCrop's attempts before its central-crop fallback
# Columns of one crop's uniforms: 4 per try (area, log-ratio, top, left), then the photometric draws,
# each its own column(s) so that they are independent, as torchvision's separate draws are.
_FLIP = 4 * _TRIES
_JITTER = _FLIP + 1
_ORDER = _JITTER + 1  # 4 columns
_FACTORS = _ORDER + 4  # 4 columns
_GRAY = _FACTORS + 4
_BLUR = _GRAY + 1
_SIGMA = _BLUR + 1
_SOLARIZE = _SIGMA + 1
UNIFORMS_PER_CROP = _SOLARIZE + 1


@dataclass
class CropParams:
    """One crop of every image of a batch (``n`` images).

    ``boxes``: int64 ``(n, 4)`` (top, left, height, width) in the source image's pixels;
    ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize``: bool ``(n,)``, whether each op applies;
    ``order``: int64 ``(n, 4)``, the order of (brightness, contrast, saturation, hue) within the jitter;
    ``factors``: float64 ``(n, 4)`` brightness, contrast and saturation factors and the hue shift;
    ``sigma``: float64 ``(n,)`` blur sigma in pixels.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    order: Tensor
    factors: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


def resized_crop_boxes(u: Tensor, heights: Tensor, widths: Tensor, scale: tuple[float, float]) -> Tensor:
    """``RandomResizedCrop.make_params`` for ``n`` images at once: int64 ``(n, 4)`` (top, left, h, w).

    ``u``: float64 ``(n, 40)`` uniforms (10 tries x area, log-ratio, top, left); ``heights``/``widths``:
    int ``(n,)`` source sizes. The first try whose rounded box fits is taken, else the central crop with
    the ratio clamped to the range (torchvision's fallback).
    """
    n = u.shape[0]
    u = u[:, : 4 * _TRIES].reshape(n, _TRIES, 4)
    height, width = heights.to(torch.float64)[:, None], widths.to(torch.float64)[:, None]
    target = height * width * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # torch.randint(0, m) on a uniform: floor(u * m), kept below m against rounding at u -> 1.
    top = torch.minimum(torch.floor(u[..., 2] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[..., 3] * (width - w + 1)), width - w)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    tried = torch.stack([top, left, h, w], dim=-1).gather(1, first[..., None].expand(-1, -1, 4))[:, 0]
    return torch.where(fits.any(dim=1, keepdim=True), tried, _fallback(heights, widths)).to(torch.int64)


def _fallback(heights: Tensor, widths: Tensor) -> Tensor:
    """torchvision's central crop after 10 failed tries: ``(n, 4)`` float64."""
    height, width = heights.to(torch.float64), widths.to(torch.float64)
    ratio = width / height
    h = torch.where(ratio < RRC_RATIO[0], torch.round(width / RRC_RATIO[0]), height)
    w = torch.where(ratio > RRC_RATIO[1], torch.round(height * RRC_RATIO[1]), width)
    return torch.stack([torch.floor((height - h) / 2), torch.floor((width - w) / 2), h, w], dim=1)


def _factor_ranges(spec: MultiCropSpec) -> Tensor:
    """ColorJitter's ranges: [max(0, 1 - s), 1 + s] for brightness, contrast, saturation; [-h, h] for hue."""
    b, c, s, h = spec.jitter
    if spec.in_chans == 1:  # the per-sample path drops saturation and hue for grayscale output
        s, h = 0.0, 0.0
    return torch.tensor(
        [[max(0.0, 1 - b), 1 + b], [max(0.0, 1 - c), 1 + c], [max(0.0, 1 - s), 1 + s], [-h, h]],
        dtype=torch.float64,
    )


def sample_crop_params(
    spec: MultiCropSpec, keys: Tensor, heights: Tensor, widths: Tensor
) -> list[CropParams]:
    """The ``spec.n_crops`` crops ``[global1, global2, locals...]`` of images with int64 ``keys`` ``(n,)``.

    ``heights``/``widths``: int ``(n,)`` sizes of the source images. Crop ``c`` of image ``i`` depends
    only on ``keys[i]``, ``c`` and the image's size (one counter stream per image, crop c reading its
    columns ``c * UNIFORMS_PER_CROP ...``, so adding local crops leaves the earlier ones unchanged).
    """
    n, crops = len(keys), spec.n_crops
    u = uniforms(keys.cpu(), 0, crops * UNIFORMS_PER_CROP).view(n, crops, UNIFORMS_PER_CROP).transpose(0, 1)
    heights, widths = heights.cpu().repeat(2), widths.cpu().repeat(2)
    boxes = [resized_crop_boxes(u[:2].flatten(0, 1), heights, widths, spec.global_scale).view(2, n, 4)]
    if spec.n_locals:
        local_u = u[2:].flatten(0, 1)
        sizes = heights[:n].repeat(spec.n_locals), widths[:n].repeat(spec.n_locals)
        boxes.append(resized_crop_boxes(local_u, *sizes, spec.local_scale).view(spec.n_locals, n, 4))
    blur_g1, blur_g2, blur_local = spec.blur_probs
    blur_prob = torch.tensor([blur_g1, blur_g2] + [blur_local] * spec.n_locals, dtype=torch.float64)
    solarize_prob = torch.zeros(crops, dtype=torch.float64)
    solarize_prob[1] = spec.solarize_prob  # BYOL's asymmetry: only the second global view
    ranges = _factor_ranges(spec)
    sigma_lo, sigma_hi = spec.blur_sigma
    fields = dict(
        boxes=torch.cat(boxes),
        flip=u[..., _FLIP] < spec.flip_prob,  # RandomHorizontalFlip: rand < p
        jitter=u[..., _JITTER] < spec.jitter_prob,  # RandomApply: applies unless rand >= p
        order=u[..., _ORDER : _ORDER + 4].argsort(dim=-1),  # ColorJitter's randperm(4)
        factors=ranges[:, 0] + u[..., _FACTORS : _FACTORS + 4] * (ranges[:, 1] - ranges[:, 0]),
        gray=u[..., _GRAY] < (spec.grayscale_prob if spec.in_chans == 3 else 0.0),
        blur=u[..., _BLUR] < blur_prob[:, None],
        sigma=sigma_lo + u[..., _SIGMA] * (sigma_hi - sigma_lo),  # GaussianBlur: uniform sigma
        solarize=u[..., _SOLARIZE] < solarize_prob[:, None],  # RandomSolarize: rand < p
    )
    return [CropParams(**{k: v[c] for k, v in fields.items()}) for c in range(crops)]
