"""Image retrieval on revisited Oxford5k / Paris6k (Radenovic et al. 2018), DINO's protocol.

Expected layout under ``root``: ``gnd_<dataset>.pkl`` (the official ground truth: ``imlist``, ``qimlist``
and ``gnd``, a list of per-query dicts with ``easy``, ``hard``, ``junk`` index lists and a ``bbx``) and
``jpg/<name>.jpg`` for every name in ``imlist`` and ``qimlist``.

Features are the [CLS] token averaged over several rescaled copies of each image, then L2-normalised;
queries are cropped to their bounding box first. Scores are cosine similarities. Reported numbers are
percentages in [0, 100] (mAP and mean precision at k), as in the papers' tables. Under torchrun each
rank extracts a strided share of the images; the gathered features, hence the scores, match one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sopvit import distributed
from sopvit.checkpoints.safe_load import load_data_pickle, read_or_explain
from sopvit.config.coerce import check
from sopvit.data.transforms import MultiCropSpec
from sopvit.device import autocast, resolve_device
from sopvit.eval.registry import register
from sopvit.models import Backbone

RetrievalDataset = Literal["roxford5k", "rparis6k"]
_PREFIX = {"roxford5k": "rox", "rparis6k": "rpar"}


@dataclass
class RetrievalConfig:
    dataset: RetrievalDataset = "roxford5k"
    root: str = ""  # folder with jpg/ and gnd_<dataset>.pkl
    image_size: int = 512  # longer side at scale 1
    scales: tuple[float, ...] = (1.0, 0.7071, 0.5)
    ks: tuple[int, ...] = (1, 5, 10)  # mean precision at these ranks
    batch_size: int = 16  # images of one size per forward pass
    device: str = "auto"  # "auto": cuda when available

    def validate(self) -> None:
        check(self.dataset in _PREFIX, "dataset", f"must be one of {sorted(_PREFIX)}")
        check(bool(self.root), "root", "is required")
        check(self.image_size > 0, "image_size", "must be > 0")
        check(len(self.scales) > 0 and min(self.scales) > 0, "scales", "must be non-empty and positive")
        check(len(self.ks) > 0 and min(self.ks) >= 1, "ks", "must be non-empty and >= 1")
        check(self.batch_size > 0, "batch_size", "must be > 0")


# ------------------------------------------------------------------------------------------------ metrics
def average_precision(ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """revisitop's ``compute_ap``: trapezoidal area under precision-recall.

    ``ranks``: sorted 0-based positions of the retrieved positives in the ranking (junk already removed);
    ``n_positives``: total number of positives (recall step is 1 / n_positives).
    """
    if n_positives <= 0:
        raise ValueError(f"n_positives must be > 0, got {n_positives}")
    ap = 0.0
    step = 1.0 / n_positives
    for j, rank in enumerate(int(r) for r in ranks):
        # Precision just before (j positives in `rank` images) and at this positive, averaged.
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * step / 2.0
    return ap


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict[str, Any]], ks: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, int]:
    """mAP, per-query APs, mean precision at each k, and the number of queries without positives.

    ``ranks``: (n_db, n_q) database indices, best first per column (``argsort`` of ``-scores``);
    ``gnd[i]``: dict with ``ok`` (positives) and optionally ``junk`` (ignored images) index lists.
    Queries without positives get AP = NaN and are excluded from every mean, as in revisitop.
    """
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_db, {len(gnd)}), got {ranks.shape}")
    n_q = len(gnd)
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(ks)), np.nan)
    n_empty = 0
    for i, g in enumerate(gnd):
        positives = np.asarray(g["ok"], dtype=np.int64)
        if positives.size == 0:
            n_empty += 1
            continue
        junk = np.asarray(g.get("junk", []), dtype=np.int64)
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, positives))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        # Junk images are dropped from the ranking: each positive moves up by the junk ranked above it.
        pos = pos - np.searchsorted(junk_pos, pos)
        aps[i] = average_precision(pos, positives.size)
        # revisitop's mP@k: precision at min(k, rank of the last positive), 1-based.
        one_based = pos + 1
        last = int(one_based.max()) if one_based.size else 0
        for j, k in enumerate(ks):
            kq = min(last, k)
            prs[i, j] = float((one_based <= kq).sum()) / kq if kq > 0 else 0.0
    valid = n_q - n_empty
    mean_ap = float(np.nansum(aps) / valid) if valid else float("nan")
    mpk = np.nansum(prs, axis=0) / valid if valid else np.full(len(ks), np.nan)
    return mean_ap, aps, mpk, n_empty


def protocol_gnd(gnd: Sequence[dict[str, Any]], protocol: Literal["medium", "hard"]) -> list[dict[str, Any]]:
    """Medium: positives easy+hard, junk ignored. Hard: positives hard, easy counts as junk too."""
    out = []
    for g in gnd:
        easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
        if protocol == "medium":
            out.append({"ok": easy + hard, "junk": junk})
        else:
            out.append({"ok": hard, "junk": junk + easy})
    return out


# ------------------------------------------------------------------------------------------------ features
def load_image(path: Path, bbx: Sequence[float] | None = None) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"retrieval image not found: {path}")
    img = Image.open(path).convert("RGB")
    if bbx is None:
        return img
    if len(bbx) != 4:
        raise ValueError(f"bbx of {path} must be [x1, y1, x2, y2], got {list(bbx)}")
    x1, y1, x2, y2 = (float(v) for v in bbx)
    return img.crop((x1, y1, x2, y2))


def _resized(img: Image.Image, longer: float, patch: int) -> Image.Image:
    w, h = img.size
    ratio = longer / max(w, h)
    # Multiples of the patch size so no pixel is dropped or padded by the patch embedding.
    nw = max(patch, round(w * ratio / patch) * patch)
    nh = max(patch, round(h * ratio / patch) * patch)
    return img.resize((nw, nh), Image.Resampling.BICUBIC)


def source_size(path: Path, bbx: Sequence[float] | None) -> tuple[int, int]:
    """(w, h) of the image ``load_image`` returns, from the file header (no decoding)."""
    if bbx is not None:
        # PIL rounds a float crop box to pixels this way
        x1, y1, x2, y2 = (round(float(v)) for v in bbx)
        return abs(x2 - x1), abs(y2 - y1)
    with Image.open(path) as img:
        return img.size


@torch.inference_mode()
def multiscale_features(
    backbone: Backbone, imgs: Sequence[Image.Image], cfg: RetrievalConfig, device: torch.device
) -> torch.Tensor:
    """(B, D) L2-normalised means of the [CLS] features of ``imgs`` rescaled to every scale in ``cfg.scales``.

    The images must share one size (aspect kept, longer side ``image_size * scale``), so each scale is one
    batched forward pass; ``sharded_features`` groups them so.
    """
    mean, std = MultiCropSpec(in_chans=3).stats
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    feat = torch.zeros(len(imgs), backbone.embed_dim, device=device)
    bf16 = autocast(device)
    for scale in cfg.scales:
        arrs = [
            np.asarray(_resized(img, cfg.image_size * scale, backbone.patch_size), dtype=np.float32)
            for img in imgs
        ]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).to(device) / 255.0
        with bf16:
            feat += backbone((x - m) / s)["cls"].float()
    return F.normalize(feat / len(cfg.scales), dim=1)


@torch.inference_mode()
def sharded_features(
    backbone: Backbone,
    images: Sequence[tuple[Path, Sequence[float] | None]],
    cfg: RetrievalConfig,
    device: torch.device,
) -> torch.Tensor:
    """(N, D) features of ``images`` (path, optional box) in order; rank r extracts r, r+W, ... only.

    Images of equal size are batched together (``cfg.batch_size`` at a time): Oxford and Paris images are
    nearly all 1024x768 or 768x1024, so almost every forward pass is a full batch.
    """
    mine = [images[i] for i in distributed.shard(len(images))]
    rows = torch.empty(len(mine), backbone.embed_dim, device=device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for j, (path, bbx) in enumerate(mine):
        by_size.setdefault(source_size(path, bbx), []).append(j)
    for group in by_size.values():
        for start in range(0, len(group), cfg.batch_size):
            chunk = group[start : start + cfg.batch_size]
            rows[chunk] = multiscale_features(backbone, [load_image(*mine[j]) for j in chunk], cfg, device)
    # a rank with no image (fewer images than ranks) still joins the gather, with (0, D) rows
    return distributed.gather_shards(rows, len(images)).cpu()


def load_gnd(root: Path, dataset: str) -> dict[str, Any]:
    path = root / f"gnd_{dataset}.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"ground truth not found: {path}")
    # The ground truth is downloaded: read as data only (lists, str, numeric arrays), never as code.
    cfg = read_or_explain(load_data_pickle, path, f"{path} is not a readable ground-truth pickle")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd, got {type(cfg).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{path}: missing field {key!r}")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{path}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    return cfg


@register("retrieval", RetrievalConfig, "revisited Oxford5k / Paris6k retrieval mAP (Medium, Hard)")
def run(backbone: Backbone, cfg: RetrievalConfig) -> dict[str, float]:
    cfg.validate()
    root = Path(cfg.root)
    meta = load_gnd(root, cfg.dataset)
    device = resolve_device(cfg.device)
    backbone = backbone.to(device).eval()
    jpg = root / "jpg"
    db_images = [(jpg / f"{n}.jpg", None) for n in meta["imlist"]]
    q_images = [(jpg / f"{n}.jpg", g.get("bbx")) for n, g in zip(meta["qimlist"], meta["gnd"], strict=True)]
    # Checked on every rank before any collective: a rank failing alone would leave the others waiting.
    missing = [str(p) for p, _ in [*db_images, *q_images] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} retrieval image(s) not found, e.g. {missing[0]}")
    for path, bbx in q_images:
        if bbx is not None and len(bbx) != 4:
            raise ValueError(f"bbx of {path} must be [x1, y1, x2, y2], got {list(bbx)}")
    db = sharded_features(backbone, db_images, cfg, device)
    queries = sharded_features(backbone, q_images, cfg, device)
    scores = (db @ queries.T).numpy()  # (n_db, n_q)
    ranks = np.argsort(-scores, axis=0, kind="stable")
    prefix = _PREFIX[cfg.dataset]
    out: dict[str, float] = {}
    for protocol in ("medium", "hard"):
        mean_ap, _, mpk, n_empty = compute_map(ranks, protocol_gnd(meta["gnd"], protocol), cfg.ks)
        out[f"{prefix}_{protocol}_map"] = 100.0 * mean_ap
        for k, p in zip(cfg.ks, mpk, strict=True):
            out[f"{prefix}_{protocol}_mp@{k}"] = 100.0 * float(p)
        out[f"{prefix}_{protocol}_n_empty"] = float(n_empty)
    return out
