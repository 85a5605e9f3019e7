"""DAVIS-2017 region similarity J and boundary accuracy F (Perazzi et al. 2016; davis2017-evaluation).

J is the IoU of the binary masks; F is the F-measure of boundary pixels matched within a tolerance of
``ceil(bound_th * image diagonal)`` pixels. Both are in [0, 1] here; callers scale them for reporting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {mask.shape}")
    return np.asarray(mask) > 0


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """IoU of two binary masks (pixels in ``void`` ignored); both empty counts as a perfect 1."""
    p, g = _binary(pred, "pred"), _binary(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    if void is not None:
        keep = ~_binary(void, "void")
        p, g = p & keep, g & keep
    union = np.logical_or(p, g).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map: a pixel is on the boundary if it differs from its E, S or SE neighbour.

    Same rule as DAVIS's ``seg2bmap`` at native resolution (including its treatment of the last row/column).
    """
    seg = _binary(seg, "seg")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """skimage's ``disk``: offsets with dx^2 + dy^2 <= radius^2."""
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a disk, via a convolution (no scipy dependency)."""
    if radius <= 0:
        return mask.copy()
    kernel = torch.from_numpy(disk(radius).astype(np.float32))[None, None]
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.conv2d(x, kernel, padding=radius)[0, 0] > 0.5).numpy()


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Boundary F-measure; ``bound_th`` < 1 is a fraction of the image diagonal, >= 1 a pixel radius."""
    p, g = _binary(pred, "pred"), _binary(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*p.shape)))
    pb, gb = seg2bmap(p), seg2bmap(g)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0  # DAVIS: precision 1 / recall 0 (or vice versa) gives F = 0
    precision = float((pb & dilate(gb, radius)).sum()) / n_p
    recall = float((gb & dilate(pb, radius)).sum()) / n_g
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def object_mean(scores: Sequence[float]) -> float:
    """One object's mean over its scored frames (NaN frames skipped); NaN when it has none."""
    return float(np.nanmean(np.asarray(scores, dtype=np.float64))) if len(scores) else math.nan


def global_means(j_obj: Sequence[float], f_obj: Sequence[float]) -> dict[str, float]:
    """``jf_mean`` from per-object means (``object_mean``), so ranks can exchange one row per object."""
    if len(j_obj) != len(f_obj):
        raise ValueError(f"J has {len(j_obj)} objects, F has {len(f_obj)}")
    if not len(j_obj):
        raise ValueError("jf_mean needs at least one object")
    j_mean = float(np.nanmean(np.asarray(j_obj, dtype=np.float64)))
    f_mean = float(np.nanmean(np.asarray(f_obj, dtype=np.float64)))
    return {"j_mean": j_mean, "f_mean": f_mean, "jf_mean": (j_mean + f_mean) / 2}


def jf_mean(j: Sequence[Sequence[float]], f: Sequence[Sequence[float]]) -> dict[str, float]:
    """DAVIS "Global" means: average each object's per-frame scores, then average over objects.

    ``j[o]`` and ``f[o]`` are the per-frame scores of object ``o`` (all objects of all videos); frames
    with NaN (no annotation) are skipped. Returns ``j_mean``, ``f_mean`` and ``jf_mean`` in [0, 1].
    """
    if len(j) != len(f):
        raise ValueError(f"J has {len(j)} objects, F has {len(f)}")
    return global_means([object_mean(x) for x in j], [object_mean(x) for x in f])
