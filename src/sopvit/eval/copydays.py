"""Copy detection on INRIA Copydays, "strong" subset, with DINO's protocol (Caron et al. 2021).

Each image is resized to ``image_size`` x ``image_size`` (320 in DINO) and described by the final-normed
[CLS] token concatenated with a GeM pooling (p = 4) of the final-normed patch tokens. When a whitening
folder is given, PCA whitening learnt on its features is applied to queries and database alike; features
are then L2-normalised and compared by cosine similarity. The queries are the 229 "strong" attacks (crops,
rotations, prints and scans, paintings ...); the database is the 157 originals plus optional distractors.
Each query has one positive, its original, and the score is the mAP in [0, 100] over the ``top_k`` nearest
database images (Holidays' trapezoidal AP, as DINO).

Expected layout under ``root`` (the two archives of the INRIA Copydays page,
https://lear.inrialpes.fr/~jegou/data.php#copydays, ``copydays_original.tar.gz`` and
``copydays_strong.tar.gz``, unpacked): ``original/2BBB00.jpg`` (one per block ``2BBB``) and
``strong/2BBBVV.jpg``. Copydays names every image ``2BBBVV``, ``2BBB`` its block (the scene) and ``VV`` the
variant, so a strong attack is matched to the original(s) sharing its first four characters.
``distractors`` and ``whitening`` are flat folders of images; DINO uses 10k and 20k random YFCC100M images
(see "Copy detection" in the facebookresearch/dino README for how to obtain them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sopvit.config.coerce import check
from sopvit.data.transforms import MultiCropSpec
from sopvit.device import autocast, resolve_device
from sopvit.distributed import gather_shards, shard
from sopvit.eval.registry import register
from sopvit.eval.retrieval import compute_map
from sopvit.models import Backbone

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class CopydaysConfig:
    root: str = ""  # folder with original/ and strong/
    image_size: int = 320  # square resize, as DINO
    gem_p: float = 4.0
    use_cls: bool = True  # False: GeM of the patch tokens only
    batch_size: int = 16
    distractors: str | None = None  # folder of extra database images (DINO: 10k YFCC100M)
    whitening: str | None = None  # folder to learn PCA whitening on (DINO: 20k YFCC100M); null: none
    pca_dim: int | None = None  # whitened dimensions kept; null: all, as DINO
    # PCA of the centred covariance; false: of the uncentred second moment, as DINO's code does
    whitening_centred: bool = False
    limit: int | None = None  # first N (sorted) distractor and whitening images (smoke tests)
    top_k: int | None = 20  # DINO scores the 20 nearest only; null: the full ranking
    num_workers: int = 4
    device: str = "auto"

    def validate(self) -> None:
        check(bool(self.root), "root", "is required")
        check(self.image_size > 0, "image_size", "must be > 0")
        check(self.gem_p > 0, "gem_p", "must be > 0")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.pca_dim is None or self.pca_dim > 0, "pca_dim", "must be > 0 or null")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or null")
        check(self.top_k is None or self.top_k > 0, "top_k", "must be > 0 or null")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device", "unknown")


# ------------------------------------------------------------------------------------------------ data
def list_images(folder: str | Path, what: str, limit: int | None = None) -> list[Path]:
    """Sorted image files of ``folder``; a clear error when it is missing or holds none."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"copydays: {what} folder not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"copydays: no images ({', '.join(IMAGE_EXTENSIONS)}) in {what} folder {path}")
    return files[:limit]


def block_id(name: str) -> str:
    """Copydays block of a file name: ``200001.jpg`` -> ``2000``."""
    return name[:4]


def strong_positives(originals: Sequence[Path], queries: Sequence[Path]) -> list[list[int]]:
    """For each query, the indices of the originals of its block (its positives)."""
    by_block: dict[str, list[int]] = {}
    for i, path in enumerate(originals):
        by_block.setdefault(block_id(path.name), []).append(i)
    positives = []
    for query in queries:
        found = by_block.get(block_id(query.name))
        if not found:
            raise ValueError(
                f"copydays: no original for {query} (block {block_id(query.name)!r}); Copydays names images "
                "2BBBVV.jpg and a strong attack shares its first four characters with its original"
            )
        positives.append(found)
    return positives


class _ImageFiles(Dataset[tuple[Tensor, bool]]):
    """Images resized to a fixed square so they batch; a failed read yields ``ok=False`` instead of raising,
    so the main process can name the file rather than surface a DataLoader worker traceback."""

    def __init__(self, paths: Sequence[Path], size: int, in_chans: int) -> None:
        self.paths, self.size, self.mode = list(paths), size, "RGB" if in_chans == 3 else "L"
        mean, std = MultiCropSpec(in_chans=in_chans).stats
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, bool]:
        try:
            with Image.open(self.paths[i]) as img:
                small = img.convert(self.mode).resize((self.size, self.size), Image.Resampling.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError):
            return torch.zeros(len(self.mean), self.size, self.size), False
        arr = np.asarray(small, dtype=np.float32).reshape(self.size, self.size, -1) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std, True


# ------------------------------------------------------------------------------------------------ features
def gem(tokens: Tensor, p: float = 4.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean over the token axis: (B, N, D) -> (B, D); tokens are clamped to ``eps`` first."""
    return tokens.clamp_min(eps).pow(p).mean(dim=1).pow(1.0 / p)


def copy_detection_features(backbone: Backbone, x: Tensor, gem_p: float, use_cls: bool) -> Tensor:
    """Final-normed [CLS] (if ``use_cls``) concatenated with the GeM of the patch tokens, float32."""
    out = backbone(x)
    # float32 before the 4th power: bf16 would lose most of the mantissa there
    pooled = gem(out["patch"].float(), gem_p)
    return torch.cat([out["cls"].float(), pooled], dim=1) if use_cls else pooled


@torch.inference_mode()
def extract_features(backbone: Backbone, paths: Sequence[Path], cfg: CopydaysConfig) -> Tensor:
    """(len(paths), F) raw features in ``paths`` order; images are sharded over ranks and gathered."""
    device = resolve_device(cfg.device)
    in_chans = int(cast(Any, backbone.model).patch_embed.proj.in_channels)
    ds = _ImageFiles([paths[i] for i in shard(len(paths))], cfg.image_size, in_chans)
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    was_training = backbone.training
    backbone.eval().to(device)
    bf16 = autocast(device)
    dim = backbone.embed_dim * (2 if cfg.use_cls else 1)
    feats, oks = [torch.empty(0, dim, device=device)], [torch.empty(0, dtype=torch.long, device=device)]
    with bf16:
        for x, ok in loader:
            feats.append(copy_detection_features(backbone, x.to(device), cfg.gem_p, cfg.use_cls))
            oks.append(ok.long().to(device))
    backbone.train(was_training)
    features = gather_shards(torch.cat(feats), len(paths)).cpu()
    valid = gather_shards(torch.cat(oks), len(paths)).cpu()
    bad = [str(paths[i]) for i in torch.nonzero(valid == 0).flatten().tolist()]
    if bad:  # raised on every rank alike, after the collectives, so no rank is left waiting
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"copydays: cannot read image {bad[0]}{more}: corrupt or not an image")
    return features


def learn_whitening(
    feats: Tensor, dim: int | None = None, centred_covariance: bool = False
) -> tuple[Tensor, Tensor]:
    """``(mean (D,), projection (D, d))``: features are mapped to ``(x - mean) @ projection``.

    DINO's ``eval_copy_detection.py`` subtracts the mean from the features it whitens but takes the PCA
    of the *uncentred* second moment ``X^T X / n``; that is the default here, to reproduce published
    numbers. ``centred_covariance=True`` uses the covariance proper, so that the whitened training
    features have identity covariance. Eigenvalues below 1e-5 of the largest are floored there, as DINO,
    so rank-deficient sets stay finite.
    """
    x = feats.double()
    mean = x.mean(dim=0)
    basis = x - mean if centred_covariance else x
    eigval, eigvec = torch.linalg.eigh(basis.T @ basis / x.shape[0])
    eigval = eigval.clamp_min(float(eigval.max()) * 1e-5)
    keep = torch.argsort(eigval, descending=True)[:dim]
    return mean.float(), (eigvec[:, keep] / eigval[keep].sqrt()).float()


def copy_detection_map(
    queries: Tensor, database: Tensor, positives: Sequence[Sequence[int]], top_k: int | None = 20
) -> float:
    """mAP in [0, 100] by cosine similarity; positives ranked beyond ``top_k`` count as not retrieved."""
    scores = (F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T).numpy()
    ranks = np.argsort(-scores, axis=1, kind="stable").T[:top_k]  # (n_db or top_k, n_q)
    mean_ap, _, _, _ = compute_map(ranks, [{"ok": list(p)} for p in positives], ks=(1,))
    return 100.0 * mean_ap


@register("copydays", CopydaysConfig, "Copydays strong copy detection mAP")
def run(backbone: Backbone, cfg: CopydaysConfig) -> dict[str, float]:
    cfg.validate()
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"copydays: root folder not found: {root}")
    if cfg.image_size % backbone.patch_size:
        raise ValueError(f"copydays: image_size {cfg.image_size} is not a multiple of {backbone.patch_size}")
    originals = list_images(root / "original", "original")
    queries = list_images(root / "strong", "strong")
    positives = strong_positives(originals, queries)
    db_paths = originals + (list_images(cfg.distractors, "distractors", cfg.limit) if cfg.distractors else [])
    query_feats = extract_features(backbone, queries, cfg)
    db_feats = extract_features(backbone, db_paths, cfg)
    if cfg.whitening:
        if cfg.pca_dim is not None and cfg.pca_dim > db_feats.shape[1]:
            raise ValueError(f"copydays: pca_dim {cfg.pca_dim} exceeds the feature size {db_feats.shape[1]}")
        whitening_feats = extract_features(backbone, list_images(cfg.whitening, "whitening", cfg.limit), cfg)
        mean, proj = learn_whitening(whitening_feats, cfg.pca_dim, cfg.whitening_centred)
        query_feats, db_feats = (query_feats - mean) @ proj, (db_feats - mean) @ proj
    return {
        "copydays_strong_map": copy_detection_map(query_feats, db_feats, positives, cfg.top_k),
        "copydays_n_queries": float(len(queries)),
        "copydays_n_db": float(len(db_paths)),
    }
