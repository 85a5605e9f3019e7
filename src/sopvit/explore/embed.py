"""``sopvit embed``: the teacher backbone's features of every image of a folder or of tar shards, as an
embeddings table (:mod:`sopvit.explore.table`) that pandas, polars and DuckDB read as it is.

Collections run to millions of images, so the run is built to be stopped and continued: rows are written
in part files of ``part_size`` images, each atomically, and a rerun of the same command computes only the
parts still missing (:mod:`sopvit.explore.progress`). Under ``torchrun`` rank r embeds its strided share of
the images into its own ``part-r-*`` files; no rank waits on another until the end, when rank 0 lists
the unreadable images and moves the finished table into place.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from sopvit import distributed
from sopvit.data.eval_transforms import EvalTransform
from sopvit.data.image_folder import decode_image
from sopvit.device import resolve_device
from sopvit.explore.model import Embedder, backbone_fingerprint, load_embedder
from sopvit.explore.progress import (
    UNREADABLE,
    Plan,
    choose_folder,
    finalize,
    missing_parts,
    part_name,
    prepare,
    write_bad,
)
from sopvit.explore.source import Batch, StrictImages, collate, open_images
from sopvit.explore.table import EmbeddingsError, TableMeta, write_part

PART_SIZE = 10_000


@dataclass(frozen=True)
class EmbedOptions:
    checkpoint: str
    data: str
    out: str
    feature: str = "cls"
    normalize: bool = True
    dtype: str = "float32"
    batch_size: int = 64
    image_size: int | None = None  # None: the backbone's own resolution
    num_workers: int | None = None  # None: up to 8, one per CPU core
    device: str = "auto"
    overwrite: bool = False
    part_size: int = PART_SIZE


@dataclass(frozen=True)
class EmbedResult:
    out: Path
    meta: TableMeta
    rows: int  # in the whole table
    unreadable: int
    computed: int  # images read in this call, all ranks together (0: the table was already complete)

    def summary(self) -> str:
        bad = (
            f"{self.unreadable} unreadable, listed in {self.out / UNREADABLE}"
            if self.unreadable
            else "none unreadable"
        )
        what = f"{self.rows} rows of {self.meta.describe()}"
        what += f" + {self.meta.head_dim}-d head" if self.meta.head_dim else ""
        if not self.computed:
            return f"{self.out} is already complete: {what} ({bad})"
        return f"wrote {what} to {self.out} ({bad})"


def _check(options: EmbedOptions) -> None:
    if options.dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {options.dtype!r}")
    for name in ("batch_size", "part_size", "image_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _listing(paths: list[str], labels: list[int]) -> str:
    digest = hashlib.sha256()
    for path, label in zip(paths, labels, strict=True):
        digest.update(f"{path}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def embed(options: EmbedOptions) -> EmbedResult:
    """Write (or finish) the table ``options.out``; every rank of a ``torchrun`` launch calls it."""
    _check(options)
    device = distributed.init_distributed(resolve_device(options.device).type)
    embedder = load_embedder(options.checkpoint)
    embedder.check_feature(options.feature)
    images, _ = open_images(options.data)
    size = options.image_size or embedder.image_size
    meta = embedder.meta(options.feature, options.normalize, options.dtype, size)
    plan = Plan(
        meta,
        str(images.root),
        len(images),
        _listing(list(images.paths), list(images.labels)),
        options.part_size,
        distributed.world_size(),
    )
    out = Path(options.out).absolute()
    folder = choose_folder(out, plan, options.overwrite)  # every rank refuses alike, before any writes
    distributed.barrier()
    if distributed.is_main_process():
        prepare(folder, plan)
    distributed.barrier()
    strict = StrictImages(images, EvalTransform(size, in_chans=embedder.in_chans))
    computed = _embed_parts(embedder.to(device), strict, folder, plan, options)
    # all ranks are done when this returns; the sum says whether any of them had work left
    mean = distributed.all_reduce_mean(torch.tensor([computed], dtype=torch.float64))
    computed = round(float(mean.item()) * plan.world_size)
    summary = finalize(folder, out, plan) if distributed.is_main_process() else None
    distributed.barrier()
    rows, bad = (summary.rows, summary.unreadable) if summary else (0, 0)
    return EmbedResult(out, meta, rows, bad, computed)


def _batches(plan: Plan, parts: list[int], batch_size: int) -> list[tuple[int, bool, list[int]]]:
    """(part, last batch of the part?, data-set indices) of this rank's missing parts; a batch never
    straddles two parts, so each part is written as soon as its last batch is in."""
    share = range(distributed.rank(), plan.images, plan.world_size)
    out = []
    for j in parts:
        mine = list(share[j * plan.part_size : (j + 1) * plan.part_size])
        starts = range(0, len(mine), batch_size)
        out += [(j, s + batch_size >= len(mine), mine[s : s + batch_size]) for s in starts]
    return out


def _embed_parts(
    embedder: Embedder, images: StrictImages, folder: Path, plan: Plan, options: EmbedOptions
) -> int:
    rank = distributed.rank()
    parts = missing_parts(folder, plan, rank)
    batches = _batches(plan, parts, options.batch_size)
    if not batches:
        return 0
    # ranks on one machine share its cores between their loader workers
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = min(8, max(1, cores)) if options.num_workers is None else options.num_workers
    device = next(embedder.backbone.parameters()).device
    loader: DataLoader[Batch] = DataLoader(
        images,  # type: ignore[arg-type]  # items are tuples; collate turns a list of them into a Batch
        batch_sampler=[indices for _, _, indices in batches],
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    total = sum(len(indices) for _, _, indices in batches)
    bar = tqdm(
        total=total, unit="img", desc="embed", disable=not distributed.is_main_process(), smoothing=0.1
    )
    rows: list[tuple[Batch, torch.Tensor, torch.Tensor | None]] = []
    with bar:
        for (part, last, _), batch in zip(batches, loader, strict=True):
            if batch.indices:
                vectors, head = embedder.features(batch.images, options.feature, options.normalize)
                rows.append((batch, vectors, head))
            elif batch.bad:
                rows.append((batch, torch.empty(0, plan.meta.dim), None))
            bar.update(len(batch.indices) + len(batch.bad))
            if last:
                _write(folder, plan, rank, part, rows, images)
                rows = []
    return total


def _write(
    folder: Path,
    plan: Plan,
    rank: int,
    part: int,
    rows: list[tuple[Batch, torch.Tensor, torch.Tensor | None]],
    images: StrictImages,
) -> None:
    paths = images.images.paths
    bad = [(i, paths[i], reason) for batch, _, _ in rows for i, reason in batch.bad]
    write_bad(folder, rank, part, bad)  # first: a part on disk has its list of unreadable images
    meta = plan.meta
    good = [(batch, v, h) for batch, v, h in rows if batch.indices]
    heads = [h for _, _, h in good if h is not None]
    head = None
    if meta.head_dim is not None:
        head = torch.cat(heads).numpy() if heads else np.zeros((0, meta.head_dim), np.float32)
    write_part(
        folder / part_name(rank, part),
        meta,
        [paths[i] for batch, _, _ in good for i in batch.indices],
        np.array([y for batch, _, _ in good for y in batch.labels], dtype=np.int64),
        torch.cat([v for _, v, _ in good]).numpy() if good else np.zeros((0, meta.dim), np.float32),
        head,
    )


def embed_image_paths(
    source: str, paths: list[str], meta: TableMeta, batch_size: int = 64, device: str = "auto"
) -> np.ndarray:
    """(N, meta.dim) float32 vectors of image files, computed as the table ``meta`` describes (same
    backbone, feature, normalisation and resolution), e.g. queries to search it with."""
    embedder = load_embedder(source)
    found = backbone_fingerprint(embedder.backbone)
    if found != meta.fingerprint:
        raise EmbeddingsError(
            f"{source} now holds backbone {found}, but the table was embedded with {meta.describe()}: "
            "re-embed the table with sopvit embed, or embed the queries as a table from the same checkpoint"
        )
    embedder.to(resolve_device(device))
    transform = EvalTransform(meta.image_size, in_chans=embedder.in_chans)
    out = [np.zeros((0, meta.dim), np.float32)]
    for start in range(0, len(paths), batch_size):
        x = torch.stack([transform(decode_image(p, "RGB")) for p in paths[start : start + batch_size]])
        out.append(embedder.features(x, meta.feature, meta.normalized)[0].numpy())
    return np.concatenate(out)
