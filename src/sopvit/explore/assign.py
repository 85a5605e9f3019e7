"""``sopvit prototypes assign``: which of a run's prototypes each image of your own collection belongs to.

The prototypes are what the run's loss compares images with, read from its checkpoint, so the answer
shows what the run has learned to tell apart on data it never saw:

- SOP (``spec.gallery == "memory"``): anchors drawn from the saved [CLS] memory as the loss draws them
  (:func:`~sopvit.methods.sop.prototypes.build_prototypes`): ``sop.cls_anchors`` rows, uniformly without
  replacement with the fixed seed :data:`SEED`, among the rows that hold real images (a young memory still
  holds its random initial rows, which are left out as the gallery leaves them out). All drawn anchors are
  kept (the loss keeps ``cls_keep_fraction`` of them per task, a choice that changes every step). Each
  image goes to the anchor its head vector is most similar to; the anchor's neighbours play no part.
- iBOT/DINO (``"head"``): the learned prototype vectors, the normalised rows of the head's last layer.

Similarities are cosines in head space: the table's ``head`` column (unit vectors) against unit prototypes.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from sopvit.explore.model import backbone_fingerprint
from sopvit.explore.page import GalleryRow, Tile, write_gallery_page
from sopvit.explore.table import EmbeddingsError, part_files, read_meta
from sopvit.export.load import read_run, teacher_encoder
from sopvit.methods.sop.prototypes import build_prototypes

SEED = 0  # of the SOP anchor draw: a rerun, or another table assigned to the same run, gets the same anchors
OUTPUTS = ("assignments.parquet", "prototypes.csv", "index.html")
_CHUNK = 16384  # table rows scored at once: bounds the (rows, prototypes) similarity block in memory


@dataclass(frozen=True)
class Prototypes:
    vectors: Tensor  # (P, K) unit rows in head space
    anchor_ids: Tensor | None  # (P,) SOP: the training-set index of each anchor's image
    method: str  # display name of the run's method


def memory_prototypes(objective: dict[str, Any], n_anchors: int, method: str) -> Prototypes:
    """SOP: ``n_anchors`` anchors (fewer if the memory holds fewer real images) of the [CLS] memory."""
    keys = ("cls_bank.embeddings", "cls_bank.sample_ids")
    if not all(k in objective for k in keys):
        raise ValueError(f"the checkpoint has no [CLS] memory ({', '.join(keys)}) to draw prototypes from")
    embeddings, ids = objective[keys[0]], objective[keys[1]]
    valid = (ids >= 0).nonzero().flatten()
    if valid.numel() < 2:
        raise ValueError(
            f"the [CLS] memory holds {valid.numel()} rows of real images, too few for prototypes: "
            "train longer"
        )
    memory = embeddings[valid].float()
    generator = torch.Generator().manual_seed(SEED)
    # k=0 and keep_fraction 1: only the anchor draw is needed, and every drawn anchor is kept
    drawn = build_prototypes(memory, min(n_anchors, memory.shape[0]), 0, 0.0, 1.0, generator)
    vectors = F.normalize(memory[drawn.anchor_index], dim=-1)
    return Prototypes(vectors, ids[valid][drawn.anchor_index].clone(), method)


def run_prototypes(checkpoint: str | Path) -> tuple[Prototypes, str]:
    """The prototypes of a training run and its teacher backbone's fingerprint."""
    state, cfg, _ = read_run(checkpoint)
    spec = cfg.spec
    teacher = teacher_encoder(state, cfg)
    found = backbone_fingerprint(teacher.backbone)
    if spec.gallery == "memory":
        anchors = int(getattr(cfg.method_config, "cls_anchors", 64))
        return memory_prototypes(state.get("objective", {}), anchors, spec.display_name), found
    weight = getattr(teacher.head.last_layer, "weight", None)  # (P, K), through the weight norm
    if spec.gallery == "head" and isinstance(weight, Tensor):
        return Prototypes(F.normalize(weight.detach().float(), dim=1), None, spec.display_name), found
    raise ValueError(
        f"{spec.display_name} runs (method={spec.name}) have neither a [CLS] memory nor learned prototypes "
        "to assign images to"
    )


def nearest(head: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's most similar prototype (N,) and that cosine (N,)."""
    ids, sims = [], []
    for start in range(0, head.shape[0], _CHUNK):
        best = (head[start : start + _CHUNK] @ prototypes.T).max(dim=1)
        ids.append(best.indices)
        sims.append(best.values)
    empty = torch.empty(0)
    return torch.cat(ids) if ids else empty.long(), torch.cat(sims) if sims else empty


@dataclass(frozen=True)
class AssignResult:
    out: Path
    images: int
    prototypes: int
    used: int  # prototypes with at least one image
    method: str

    def summary(self) -> str:
        return (
            f"assigned {self.images} images to {self.used} of the {self.prototypes} {self.method} "
            "prototypes; "
            f"wrote {', '.join(str(self.out / name) for name in OUTPUTS)}"
        )


def assign_prototypes(
    checkpoint: str | Path,
    embeddings: str | Path,
    out: Path,
    top: int = 12,
    per_prototype: int = 8,
    overwrite: bool = False,
) -> AssignResult:
    """Write ``out``/assignments.parquet, prototypes.csv and index.html (see the module docstring)."""
    if top < 0 or per_prototype < 1:
        raise ValueError(f"--top must be >= 0 and --per-prototype >= 1, got {top} and {per_prototype}")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise EmbeddingsError(f"{out} already holds {', '.join(existing)}: pass --overwrite to replace them")
    meta = read_meta(Path(embeddings))
    if meta.head_dim is None:
        raise EmbeddingsError(
            f"{embeddings} has no head column (embedded from an export, which has no projection head): "
            f"re-embed with sopvit embed --checkpoint {checkpoint}"
        )
    prototypes, found = run_prototypes(checkpoint)
    if found != meta.fingerprint:
        raise EmbeddingsError(
            f"{embeddings} holds {meta.describe()} but the teacher backbone of {checkpoint} is {found}: "
            f"re-embed with sopvit embed --checkpoint {checkpoint}"
        )
    if prototypes.vectors.shape[1] != meta.head_dim:
        raise EmbeddingsError(
            f"{embeddings} has a {meta.head_dim}-d head column but the prototypes of {checkpoint} are "
            f"{prototypes.vectors.shape[1]}-d: re-embed with sopvit embed --checkpoint {checkpoint}"
        )
    paths, labels, head = _read_head(Path(embeddings), meta.head_dim)
    ids, sims = nearest(head, prototypes.vectors)
    counts = torch.bincount(ids, minlength=prototypes.vectors.shape[0])
    out.mkdir(parents=True, exist_ok=True)
    _write_assignments(out / OUTPUTS[0], paths, labels, ids, sims)
    _write_counts(out / OUTPUTS[1], counts, prototypes.anchor_ids)
    largest = [int(p) for p in counts.argsort(descending=True, stable=True)[:top] if counts[p] > 0]
    rows = _gallery(head, prototypes, largest, counts, paths, per_prototype)
    intro = (
        f"{len(paths)} images of {embeddings} ({meta.describe()}), each assigned to the most similar "
        f"of the {len(counts)} {prototypes.method} prototypes of {checkpoint} (cosine in the head's space). "
        f"The {len(rows)} largest prototypes are shown with their {per_prototype} nearest images."
    )
    write_gallery_page(out / OUTPUTS[2], f"{prototypes.method} prototypes", intro, rows, overwrite=True)
    return AssignResult(out, len(paths), len(counts), int((counts > 0).sum()), prototypes.method)


def _read_head(root: Path, width: int) -> tuple[list[str], np.ndarray, Tensor]:
    """Paths, labels and head vectors: the embedding column, often the widest, is never read."""
    parts = [pq.read_table(p, columns=["path", "label", "head"]) for p in part_files(root)]
    table = pa.concat_tables(parts)
    flat = table.column("head").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    head = torch.from_numpy(flat.astype(np.float32).reshape(-1, width))
    return table.column("path").to_pylist(), table.column("label").to_numpy().astype(np.int64), head


def _gallery(
    head: Tensor, prototypes: Prototypes, chosen: list[int], counts: Tensor, paths: list[str], k: int
) -> list[GalleryRow]:
    if not chosen:
        return []
    scores = head @ prototypes.vectors[chosen].T  # (N, len(chosen))
    best = scores.topk(min(k, scores.shape[0]), dim=0)
    rows = []
    for c, p in enumerate(chosen):
        title = f"prototype {p}: {int(counts[p])} images ({float(counts[p]) / head.shape[0]:.1%})"
        if prototypes.anchor_ids is not None:
            title += f", anchor: training image #{int(prototypes.anchor_ids[p])}"
        tiles = [
            Tile(paths[int(i)], f"{float(s):.3f}")
            for i, s in zip(best.indices[:, c], best.values[:, c], strict=True)
        ]
        rows.append(GalleryRow(title, tiles))
    return rows


def _write_assignments(path: Path, paths: list[str], labels: np.ndarray, ids: Tensor, sims: Tensor) -> None:
    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "prototype": pa.array(ids.numpy().astype(np.int64)),
            "similarity": pa.array(sims.numpy().astype(np.float32)),
        }
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_counts(path: Path, counts: Tensor, anchor_ids: Tensor | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prototype", "count"] + ([] if anchor_ids is None else ["anchor_sample_id"]))
        for p, count in enumerate(counts.tolist()):
            writer.writerow([p, count] + ([] if anchor_ids is None else [int(anchor_ids[p])]))
    os.replace(tmp, path)
