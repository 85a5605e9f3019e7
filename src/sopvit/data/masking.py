"""Block-wise masking of a patch grid (BEiT / iBOT style) for masked image modelling."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["BlockMaskGenerator"]


class _UniformStream:
    """Uniform [0, 1) numbers drawn from a torch generator in chunks.

    Drawing one scalar per ``torch.rand`` call costs microseconds of dispatch each and the
    rectangle search needs dozens per mask, so numbers are drawn in blocks and consumed from
    a python list. The stream is fully determined by the generator state.
    """

    def __init__(self, generator: torch.Generator | None, chunk: int = 512) -> None:
        self._generator = generator
        self._chunk = chunk
        self._values: list[float] = []
        self._pos = 0

    def __call__(self) -> float:
        if self._pos >= len(self._values):
            self._values = torch.rand(self._chunk, generator=self._generator, dtype=torch.float64).tolist()
            self._pos = 0
        value = self._values[self._pos]
        self._pos += 1
        return value


def _parse_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"grid must be a positive int or a pair of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


class BlockMaskGenerator:
    """Samples BEiT/iBOT block-wise masks over an ``(h, w)`` patch grid.

    A mask is the union of random rectangles (area at least ``min_num_patches`` and aspect ratio
    in ``[min_aspect, max_aspect]``) added one at a time until ``round(ratio * h * w)`` patches
    are covered or no rectangle fits the remaining budget after ``max_attempts`` tries. Like
    BEiT, the result can fall a few patches short of the target but never exceeds it.

    Args:
        grid: patch grid ``(h, w)`` (an int means a square grid), e.g. ``global_size // patch_size``.
        ratio: fraction of patches to mask; a ``(lo, hi)`` pair samples it uniformly per mask.
        mask_prob: probability that a mask is drawn at all; otherwise the mask is empty. iBOT's
            "mix of 0 and U[0.1, 0.5]" is ``ratio=(0.1, 0.5), mask_prob=0.5``.
        min_aspect: smallest rectangle aspect ratio (height / width).
        max_aspect: largest aspect ratio; defaults to ``1 / min_aspect``.
        min_num_patches: smallest rectangle area in patches.
        max_attempts: rectangle proposals per block before giving up.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        ratio: float | tuple[float, float] = 0.3,
        mask_prob: float = 1.0,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        min_num_patches: int = 4,
        max_attempts: int = 10,
    ) -> None:
        self.grid = _parse_grid(grid)
        if isinstance(ratio, (int, float)):
            ratio_range = (float(ratio), float(ratio))
        else:
            if len(ratio) != 2:
                raise ValueError(f"ratio must be a float or a (lo, hi) pair, got {ratio!r}")
            ratio_range = (float(ratio[0]), float(ratio[1]))
        if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
            raise ValueError(f"ratio must satisfy 0 <= lo <= hi <= 1, got {ratio!r}")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.ratio = ratio_range
        self.mask_prob = float(mask_prob)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.min_num_patches = int(min_num_patches)
        self.max_attempts = int(max_attempts)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, ratio={self.ratio}, mask_prob={self.mask_prob}, "
            f"aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g}), min_num_patches={self.min_num_patches})"
        )

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        """One mask: BoolTensor ``(h, w)``, True = masked patch."""
        return torch.from_numpy(self._sample_one(_UniformStream(generator, chunk=128)))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent masks: BoolTensor ``(n, h, w)``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        uniform = _UniformStream(generator)
        masks = np.zeros((n, *self.grid), dtype=bool)
        for i in range(n):
            masks[i] = self._sample_one(uniform)
        return torch.from_numpy(masks)

    def _sample_one(self, uniform: _UniformStream) -> np.ndarray:
        height, width = self.grid
        mask = np.zeros((height, width), dtype=bool)
        if self.mask_prob < 1.0 and uniform() >= self.mask_prob:
            return mask
        lo, hi = self.ratio
        ratio = lo if hi == lo else lo + uniform() * (hi - lo)
        target = round(ratio * height * width)
        count = 0
        while count < target:
            delta = self._add_block(mask, target - count, uniform)
            if delta == 0:
                break
            count += delta
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, uniform: _UniformStream) -> int:
        """Masks one rectangle adding between 1 and ``budget`` new patches; returns how many."""
        height, width = mask.shape
        min_area = min(self.min_num_patches, budget)
        log_lo, log_hi = self._log_aspect
        for _ in range(self.max_attempts):
            area = min_area + uniform() * (budget - min_area)
            aspect = math.exp(log_lo + uniform() * (log_hi - log_lo))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            # BEiT requires h < height strictly; allowing full-height/width blocks matters only on
            # tiny grids (e.g. 7x7 for 28 px Fashion-MNIST) where it would otherwise starve.
            if not (0 < h <= height and 0 < w <= width):
                continue
            top = min(int(uniform() * (height - h + 1)), height - h)
            left = min(int(uniform() * (width - w + 1)), width - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0
