"""Block-wise masking of a patch grid (BEiT / iBOT style) for masked image modelling."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["BlockMaskGenerator", "default_max_blocks"]


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


def default_max_blocks(grid: tuple[int, int]) -> int:
    """A block cap for :meth:`BlockMaskGenerator.from_uniforms` that fewer than 1e-4 of the masks reach.

    Blocks the loop version adds per mask, worst of ratio (0.1, 0.5) and 0.3 at mask_prob 1.0 (mask_prob
    0.5 halves the tails), 500k masks per grid (300k for 56x56); P(>k) is the fraction needing more than
    k blocks:

        grid    most seen   P(>14)   P(>16)   P(>21)   P(>26)
        4x4         5         0        0
        7x7        10         0        0
        14x14      18       5.2e-5   2.0e-6
        28x28      23       6.0e-3   1.1e-3   1.2e-5
        56x56      27                1.4e-2   4.2e-4   3.3e-6

    The tail moves out by 4-5 blocks per doubling of the grid side, hence 16 up to a 14-patch side and
    5 more per doubling. A capped mask just stops a few patches short, as BEiT masks may anyway; larger
    mask ratios need more blocks and should pass ``max_blocks`` explicitly.
    """
    doublings = max(0, math.ceil(math.log2(max(grid) / 14)))
    return 16 + 5 * doublings


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
        max_blocks: rectangles :meth:`from_uniforms` adds at most per mask (it needs a fixed number of
            uniforms); defaults to :func:`default_max_blocks` of the grid. :meth:`sample` is not capped.
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
        max_blocks: int | None = None,
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
        max_blocks = default_max_blocks(self.grid) if max_blocks is None else max_blocks
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.ratio = ratio_range
        self.mask_prob = float(mask_prob)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.min_num_patches = int(min_num_patches)
        self.max_attempts = int(max_attempts)
        self.max_blocks = int(max_blocks)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def uniforms_per_mask(self) -> int:
        """Columns :meth:`from_uniforms` reads: gate, ratio, then (area, aspect, top, left) per proposal."""
        return 2 + self.max_blocks * self.max_attempts * 4

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

    def from_uniforms(self, u: Tensor) -> Tensor:
        """Masks for many images at once, from caller-supplied uniforms (e.g. a per-image hash RNG).

        Same algorithm and distribution as :meth:`sample`, vectorised over masks: a round adds one block
        to every mask still short of its target, proposing all ``max_attempts`` rectangles in parallel
        and keeping the first that fits. Row ``i`` of ``u`` alone determines mask ``i``.

        Args:
            u: float64 ``(n, uniforms_per_mask)`` in ``[0, 1)`` on any device. Column 0 gates the mask
                with ``mask_prob``, column 1 draws the ratio, then ``max_blocks`` rounds of
                ``max_attempts`` proposals use 4 columns each: area, aspect, top, left.

        Returns:
            BoolTensor ``(n, h, w)`` on ``u``'s device, True = masked patch.
        """
        k = self.uniforms_per_mask
        if u.dim() != 2 or u.shape[1] != k or u.dtype != torch.float64:
            raise ValueError(
                f"u must be a float64 tensor of shape (n, uniforms_per_mask) = (n, {k}), "
                f"got {u.dtype} of shape {tuple(u.shape)}"
            )
        height, width = self.grid
        n, attempts, device = u.shape[0], self.max_attempts, u.device
        lo, hi = self.ratio
        # Same float64 operations in the same order as the loop version, so the same uniforms give
        # the same targets and rectangle sizes (ratio * height * width associates left to right).
        ratio = u[:, 1] * (hi - lo) + lo if hi != lo else torch.full_like(u[:, 1], lo)
        target = torch.round(ratio * height * width).long()
        target = torch.where(u[:, 0] < self.mask_prob, target, 0)
        proposals = u[:, 2:].reshape(n, self.max_blocks, attempts, 4)
        log_lo, log_hi = self._log_aspect
        aspect = torch.exp(proposals[..., 1] * (log_hi - log_lo) + log_lo)
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        mask = torch.zeros(n, height, width, dtype=torch.bool, device=device)
        # Summed-area table of the mask, zero-padded on top and left: the patches a rectangle already
        # covers are four lookups instead of an (n, attempts, h, w) tensor per round.
        # int32 holds any grid's counts and makes the cumulative sums several times faster than int64 on CPU.
        table = torch.zeros(n, height + 1, width + 1, dtype=torch.int32, device=device)
        count = torch.zeros(n, dtype=torch.long, device=device)
        active = target > 0
        for r in range(self.max_blocks):
            # Stopping early needs the flag on the host, a stream sync on accelerators; there all rounds
            # run and finished masks simply accept no proposal.
            if device.type == "cpu" and not bool(active.any()):
                break
            budget = (target - count)[:, None]
            min_area = budget.clamp(max=self.min_num_patches)
            area = min_area + proposals[:, r, :, 0] * (budget - min_area)
            h = torch.round(torch.sqrt(area * aspect[:, r])).long()
            w = torch.round(torch.sqrt(area / aspect[:, r])).long()
            fits = (h > 0) & (h <= height) & (w > 0) & (w <= width)
            # Rectangles that do not fit are rejected by `fits`; clamping only keeps their lookups in
            # range. int() truncates in the loop version; the products are >= 0, so floor agrees.
            h, w = h.clamp(0, height), w.clamp(0, width)
            top = torch.minimum((proposals[:, r, :, 2] * (height - h + 1)).floor().long(), height - h)
            left = torch.minimum((proposals[:, r, :, 3] * (width - w + 1)).floor().long(), width - w)
            bottom, right = top + h, left + w
            table[:, 1:, 1:] = mask.cumsum(2, dtype=torch.int32).cumsum(1, dtype=torch.int32)
            corner_rows = torch.cat([bottom, top, top, bottom], 1)
            corners = corner_rows * (width + 1) + torch.cat([right, right, left, left], 1)
            b_r, t_r, t_l, b_l = table.view(n, -1).gather(1, corners).view(n, 4, attempts).unbind(1)
            new = h * w - (b_r - t_r + t_l - b_l)
            ok = fits & (new > 0) & (new <= budget) & active[:, None]
            first = ok & (ok.cumsum(1) == 1)
            # All zeros where no proposal fits, giving an empty rectangle.
            chosen = (torch.stack([top, bottom, left, right, new], 1) * first[:, None]).sum(2)
            in_rows = (rows >= chosen[:, 0, None]) & (rows < chosen[:, 1, None])
            in_cols = (cols >= chosen[:, 2, None]) & (cols < chosen[:, 3, None])
            mask |= in_rows[:, :, None] & in_cols[:, None, :]
            count += chosen[:, 4]
            # A mask none of whose proposals fit stops for good, as the loop version's `break`.
            active = ok.any(1) & (count < target)
        return mask
