"""iBOT multi-crop of whole batches on the training device (``data.augment_on: device``).

The per-sample path (``MultiCropTransform`` in DataLoader workers) costs milliseconds of CPU per image.
Here the random parameters of the whole batch are drawn at once (``crop_params``: torchvision's
distributions, keyed by (seed, epoch, image)) and the pixels are processed with batched ops on the
images' device. Deliberate differences from the per-sample path, none in the random parameters:
crops are resampled bilinearly by ``roi_align`` (area-averaged when shrinking: ``sampling_ratio`` 0
adapts the samples per output pixel to each crop) instead of bicubically, and the crops stay float
(the per-sample path rounds to uint8 after the resize and after each photometric op).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

from sopvit.data.crop_params import CropParams, sample_crop_params
from sopvit.data.photometric import apply_photometric, gray
from sopvit.data.transforms import MultiCropSpec

__all__ = ["BatchMultiCrop"]


def _to_float(image: Tensor, in_chans: int) -> Tensor:
    """uint8 or float ``(..., C, H, W)`` -> float in [0, 1]; RGB becomes gray for 1-channel output.

    Gray input for RGB output stays 1-channel until the end: saturation, hue and grayscale leave a gray
    image unchanged, so 3 channels would triple the work for nothing.
    """
    if image.dtype == torch.uint8:
        x = image.float().div_(255.0)
    elif image.is_floating_point():
        x = image.float()
    else:
        raise TypeError(f"images must be uint8 or floating point, got {image.dtype}")
    if x.shape[-3] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(image.shape)}")
    return gray(x) if in_chans == 1 and x.shape[-3] == 3 else x


def _rois(params: Sequence[CropParams]) -> Tensor:
    """roi_align boxes ``(len(params) * n, 5)``: (batch index, x1, y1, x2, y2), crop-major."""
    rows = []
    for p in params:
        top, left, h, w = p.boxes.to(torch.float32).unbind(1)
        index = torch.arange(len(top), dtype=torch.float32)
        rows.append(torch.stack([index, left, top, left + w, top + h], dim=1))
    return torch.cat(rows) if rows else torch.empty(0, 5)


def _cat(params: Sequence[CropParams]) -> CropParams:
    fields = CropParams.__dataclass_fields__
    return CropParams(**{f: torch.cat([getattr(p, f) for p in params]) for f in fields})


class BatchMultiCrop:
    """Batched iBOT multi-crop: ``__call__(images, keys) -> [global1, global2, locals...]``.

    ``images``: uint8 (or float in [0, 1]) ``(B, C, H, W)``, or a sequence of ``(C, H_i, W_i)`` of
    different sizes, C in {1, 3}, all on one device; ``keys``: int64 ``(B,)`` per-image keys
    (``counter_rng.image_keys``). Output: float32 ``(B, in_chans, s, s)`` per crop (``s`` = global then
    local size), normalised, on the images' device. Image ``i``'s crops depend only on ``keys[i]``.
    """

    def __init__(self, spec: MultiCropSpec, sampling_ratio: int = 0) -> None:
        if sampling_ratio < 0:
            raise ValueError(f"sampling_ratio must be >= 0, got {sampling_ratio}")
        self.spec = spec
        self.sampling_ratio = sampling_ratio

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"

    def params(self, images: Tensor | Sequence[Tensor], keys: Tensor) -> list[CropParams]:
        """The random parameters of every crop (on the CPU), as ``__call__`` would draw them."""
        sizes = self._sizes(images, keys)
        return sample_crop_params(self.spec, keys, sizes[:, 0], sizes[:, 1])

    def __call__(self, images: Tensor | Sequence[Tensor], keys: Tensor) -> list[Tensor]:
        spec = self.spec
        params = self.params(images, keys)
        n = len(keys)
        if n == 0:
            device = images.device if isinstance(images, Tensor) else keys.device
            return [torch.empty(0, spec.in_chans, s, s, device=device) for s in spec.crop_sizes()]
        if isinstance(images, Tensor):
            x = _to_float(images, spec.in_chans)
            globals_ = self._resample(x, _rois(params[:2]).to(x.device), spec.global_size)
            locals_ = self._resample(x, _rois(params[2:]).to(x.device), spec.local_size)
        else:
            globals_, locals_ = self._per_image(images, params)
        out = [apply_photometric(globals_[c * n : (c + 1) * n], params[c], spec) for c in range(2)]
        if spec.n_locals:
            out += apply_photometric(locals_, _cat(params[2:]), spec).split(n)
        return out

    def _sizes(self, images: Tensor | Sequence[Tensor], keys: Tensor) -> Tensor:
        """int64 ``(B, 2)`` heights and widths, after checking the batch."""
        if keys.dtype != torch.int64 or keys.ndim != 1:
            raise ValueError(f"keys must be int64 of shape (B,), got {keys.dtype} {tuple(keys.shape)}")
        if isinstance(images, Tensor):
            if images.ndim != 4:
                raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
            sizes = torch.tensor([images.shape[-2:]], dtype=torch.int64).expand(images.shape[0], 2)
        else:
            if any(not isinstance(im, Tensor) or im.ndim != 3 for im in images):
                raise ValueError("images must be (C, H, W) tensors when given as a sequence")
            sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.int64).view(-1, 2)
        if len(sizes) != len(keys):
            raise ValueError(f"got {len(sizes)} images but {len(keys)} keys")
        return sizes

    def _resample(self, x: Tensor, rois: Tensor, size: int) -> Tensor:
        return roi_align(x, rois, (size, size), 1.0, self.sampling_ratio, aligned=True)

    def _per_image(self, images: Sequence[Tensor], params: list[CropParams]) -> tuple[Tensor, Tensor]:
        """Images of different sizes: two roi_align calls per image, crops regrouped crop-major."""
        spec, n = self.spec, len(images)
        rois = [_rois(params[:2]), _rois(params[2:])]  # crop-major: image i's crops are rows i, i + n, ...
        for r in rois:
            r[:, 0] = 0  # each call crops one image
        globals_, locals_ = [], []
        for i, image in enumerate(images):
            x = _to_float(image[None], spec.in_chans)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] < spec.in_chans else x  # batch gray with RGB
            globals_.append(self._resample(x, rois[0][i::n].to(x.device), spec.global_size))
            locals_.append(self._resample(x, rois[1][i::n].to(x.device), spec.local_size))
        # (image, crop) order -> (crop, image) order, as the tensor path produces
        g = torch.stack(globals_, dim=1).flatten(0, 1)
        return g, torch.stack(locals_, dim=1).flatten(0, 1) if spec.n_locals else g[:0]
