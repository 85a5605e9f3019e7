"""``sopvit dedup``: groups of near-duplicate images in an embeddings table.

Two images are near-duplicates when their cosine similarity reaches ``threshold``; a group is a connected
component of that relation, so a chain of resized, re-encoded and cropped copies of one photo is one group
even where its two ends fall below the threshold. Pairs come from a FAISS range search of every vector
against the table (the ``search`` index: exact, or IVF where it pays), in batches, and stop with an error
when a threshold so low that it pairs most of the table would fill the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from sopvit.explore.page import GalleryRow, Tile, write_gallery_page
from sopvit.explore.search import build_index, choose_index, output_dir, refuse_existing, unit_rows
from sopvit.explore.table import read_embeddings

TOLERANCE = 1e-5  # float32 rounding: an image and its exact copy score 0.99999994, and must meet 1.0
BATCH = 4096  # queries per range search: bounds the result buffers faiss allocates at once
MAX_PAIRS = 50_000_000  # 800 MB of pair indices; a threshold that finds more groups nothing useful
PAGE_GROUPS = 200  # groups shown in index.html; groups.csv holds them all


class DedupError(ValueError):
    """A threshold or table dedup cannot work with; the message says why."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:  # also refuses NaN
        raise DedupError(f"--threshold must be in (0, 1] (a cosine similarity), got {threshold}")


def near_pairs(vectors: np.ndarray, threshold: float, index: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Row pairs ``(i, j)``, ``i < j``, of ``vectors`` (unit rows) with cosine >= ``threshold``."""
    n = len(vectors)
    faiss_index = build_index(vectors, choose_index(index, n, n))
    firsts, seconds, found = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
    for start in range(0, n, BATCH):
        lims, sims, ids = faiss_index.range_search(vectors[start : start + BATCH], threshold - TOLERANCE)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (ids > rows) & (sims >= threshold - TOLERANCE)  # each pair once, never an image with itself
        firsts.append(rows[keep])
        seconds.append(ids[keep])
        found += int(keep.sum())
        if found > MAX_PAIRS:
            raise DedupError(
                f"--threshold {threshold} pairs over {MAX_PAIRS:,} images already: near-duplicates are "
                "rare, so this threshold is too low for the table (try 0.95 or more)"
            )
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


def components(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Each of ``n`` nodes' component, named by its lowest node, for the edges ``first[e]-second[e]``.

    Hooking and pointer jumping in numpy (no per-edge Python loop): each round hooks every edge's larger
    root under its smaller one, so roots only decrease and the loop ends when every edge has one root.
    """
    root = np.arange(n)
    while True:
        a, b = root[first], root[second]
        if np.array_equal(a, b):
            return root
        low = np.minimum(a, b)
        np.minimum.at(root, a, low)
        np.minimum.at(root, b, low)
        while not np.array_equal(jumped := root[root], root):
            root = jumped


@dataclass
class DedupResult:
    out: Path
    groups: int
    images: int  # in all groups together
    index: str

    def summary(self) -> str:
        if not self.groups:
            return f"wrote {self.out}: no near-duplicates found ({self.index} index)"
        return (
            f"wrote {self.out}: {_count(self.groups, 'group')} of near-duplicates, {self.images} images "
            f"({self.images - self.groups} removable keeping one per group; {self.index} index)"
        )


def find_groups(vectors: np.ndarray, threshold: float, index: str = "auto") -> tuple[list[np.ndarray], str]:
    """Groups of two or more rows (each sorted, first the earliest row), in order of their first row."""
    _check_threshold(threshold)
    kind = choose_index(index, len(vectors), len(vectors))
    first, second = near_pairs(vectors, threshold, kind)
    root = components(len(vectors), first, second)
    order = np.argsort(root, kind="stable")  # stable: members stay in table order within a group
    starts = np.flatnonzero(np.r_[True, np.diff(root[order]) != 0])
    members = np.split(order, starts[1:])
    return [m for m in members if len(m) > 1], kind


def dedup(
    embeddings: Path, threshold: float, out: Path, overwrite: bool = False, index: str = "auto"
) -> DedupResult:
    """Write ``out``/groups.csv (group, path, label, similarity to the group's first) and index.html."""
    embeddings, out = Path(embeddings), Path(out)
    _check_threshold(threshold)  # before reading a table of millions of rows
    choose_index(index, 0, 0)
    refuse_existing(out, overwrite)
    table = read_embeddings(embeddings)
    vectors = unit_rows(table.vectors, copy=False)
    groups, kind = find_groups(vectors, threshold, index)
    members = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    firsts = np.concatenate([np.full(len(g), g[0]) for g in groups]) if groups else members
    sims = np.einsum("ij,ij->i", vectors[members], vectors[firsts])
    csv = pa.table(
        {
            "group": pa.array(np.repeat(np.arange(1, len(groups) + 1), [len(g) for g in groups]), pa.int64()),
            "path": pa.array([table.paths[i] for i in members], pa.string()),
            "label": pa.array(table.labels[members], pa.int64()),
            "similarity": pa.array(np.minimum(sims, 1.0), pa.float32()),
        }
    )
    rows, at = [], 0
    for g, group in enumerate(groups[:PAGE_GROUPS]):
        tiles = [
            Tile(table.paths[i], "first" if r == 0 else f"{sims[at + r]:.3f}") for r, i in enumerate(group)
        ]
        rows.append(GalleryRow(f"group {g + 1}: {len(group)} images", tiles))
        at += len(group)
    intro = (
        f"{_count(len(groups), 'group')} of near-duplicates (cosine >= {threshold}, linked in chains) among "
        f"{len(vectors)} images of {embeddings} ({table.meta.describe()}); {kind} index"
        + (f"; the first {PAGE_GROUPS} groups shown, all in groups.csv" if len(groups) > PAGE_GROUPS else "")
    )
    with output_dir(out, overwrite) as tmp:
        pacsv.write_csv(csv, tmp / "groups.csv")
        write_gallery_page(tmp / "index.html", "sopvit dedup", intro, rows)
    return DedupResult(out, len(groups), len(members), kind)
