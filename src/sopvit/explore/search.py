"""``sopvit search``: the nearest images of an embeddings table to query images, by cosine similarity.

Vectors are L2-normalised and searched by inner product with FAISS. The index is built for each run
(tables change; a stale saved index would answer silently wrong), so its build counts against its speed:
``exact`` (``IndexFlatIP``) scans every vector per query and needs no training; ``ivf`` (``IndexIVFFlat``,
``4 sqrt(N)`` lists) first clusters the table and assigns every vector to a list, then scans ``NPROBE``
lists per query. ``auto`` takes IVF only where ``benchmarks/search.py`` measured that build paid back by
faster queries, at the ``NPROBE`` that kept recall@10 >= 0.95 (docs/search.md has the numbers).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from sopvit.data.image_folder import IMAGE_EXTENSIONS, scan_images
from sopvit.explore.page import GalleryRow, OutputExistsError, Tile, write_gallery_page
from sopvit.explore.table import PART_GLOB, Embeddings, TableMeta, read_embeddings, read_meta

INDEX_KINDS = ("auto", "exact", "ivf")
IVF_MIN_VECTORS = 200_000  # auto: smaller tables scan fast, and their sparse lists cost IVF recall
# IVF's build (k-means, then assigning every vector to a list) took as long as exact search of 0.75 to 1.4
# queries per list, from 100k to 5M vectors: auto takes IVF from this many queries per list on.
IVF_QUERIES_PER_LIST = 1
NPROBE = 16  # lists scanned per query: the smallest with recall@10 >= 0.95 from 100k to 5M (docs/search.md)
TRAIN_PER_LIST = 50  # k-means sample: faiss warns below 39 points a centroid; more buys little
PAGE_QUERIES = 100  # queries shown in index.html; the CSV and Parquet files hold them all


def unit_rows(vectors: np.ndarray, copy: bool = True) -> np.ndarray:
    """``vectors`` with unit-length rows (a zero row stays zero), so inner product is cosine: float32,
    a copy, or with ``copy=False`` in place where they already are float32 (a 5M table is 7.7 GB)."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=copy or None)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def ivf_lists(n: int) -> int:
    """``4 sqrt(N)`` lists, but never fewer than 39 vectors a list to train their centroids on."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def choose_index(kind: str, vectors: int, queries: int) -> str:
    if kind not in INDEX_KINDS:
        raise ValueError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    pays = queries >= IVF_QUERIES_PER_LIST * ivf_lists(vectors)
    return "ivf" if vectors >= IVF_MIN_VECTORS and pays else "exact"


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k >= len(points):
        return points.copy()
    km = faiss.Kmeans(points.shape[1], k, niter=20, spherical=True, seed=seed, min_points_per_centroid=1)
    km.train(points)
    return np.asarray(km.centroids, dtype=np.float32)


def ivf_centroids(sample: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """About ``nlist`` spherical k-means centroids of ``sample``, clustered in two levels.

    One k-means of ``nlist`` centroids costs ``sample x nlist`` distances per iteration (minutes at 1M
    vectors on a laptop); ``sqrt(nlist)`` coarse clusters, each split in proportion to its size, cost
    ``2 sqrt(nlist)`` per point and give lists as good for IVF (faiss's own ``two_level_clustering``).
    """
    coarse = max(1, round(math.sqrt(nlist)))
    top = _kmeans(sample, coarse, seed)
    _, assign = faiss.knn(sample, top, 1, metric=faiss.METRIC_INNER_PRODUCT)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=len(top))
    threads = faiss.omp_get_max_threads()
    # Each split is small: OpenMP's start and barriers cost more than it saves (10x slower measured on
    # 2 busy cores), so one thread does each.
    faiss.omp_set_num_threads(1)
    try:
        parts = [
            _kmeans(sample[assign == g], max(1, round(nlist * int(size) / len(sample))), seed + 1 + g)
            for g, size in enumerate(sizes)
            if size
        ]
    finally:
        faiss.omp_set_num_threads(threads)
    return unit_rows(np.concatenate(parts))


def trained_ivf(sample: np.ndarray, nlist: int, nprobe: int = NPROBE, seed: int = 0) -> faiss.IndexIVFFlat:
    """An empty inner-product ``IndexIVFFlat`` whose lists are ``ivf_centroids`` of ``sample`` (unit rows)."""
    rows = np.random.default_rng(seed).permutation(len(sample))[: TRAIN_PER_LIST * nlist]
    centroids = ivf_centroids(sample[np.sort(rows)], nlist, seed)
    quantizer = faiss.IndexFlatIP(sample.shape[1])
    quantizer.add(centroids)
    # Trained as built: IVF-Flat learns nothing beyond its quantizer's centroids.
    index = faiss.IndexIVFFlat(quantizer, sample.shape[1], len(centroids), faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(nprobe, len(centroids))
    return index


def build_index(vectors: np.ndarray, kind: str, nprobe: int = NPROBE, seed: int = 0) -> faiss.Index:
    """An inner-product index over ``vectors`` (unit rows), ``kind`` ``exact`` or ``ivf``."""
    if kind == "exact":
        index: faiss.Index = faiss.IndexFlatIP(vectors.shape[1])
    else:
        index = trained_ivf(vectors, ivf_lists(len(vectors)), nprobe, seed)
    index.add(vectors)  # at once: added in chunks, the flat index's storage would grow by doubling
    return index


class SearchError(ValueError):
    """A query, k, or output the search cannot take; the message says which and why."""


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: pass --overwrite to replace it")


@contextmanager
def output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` whole when the block succeeds."""
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        refuse_existing(out, overwrite)  # again: another run may have written it meanwhile
        if out.exists():
            os.replace(out, old)  # a folder cannot be renamed over a folder: move the old one aside
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _embed_images(paths: list[str], meta: TableMeta) -> np.ndarray:
    from sopvit.explore.embed import embed_image_paths  # torch and timm: only for image queries

    if not Path(meta.source).exists():
        raise SearchError(
            f"query images must be embedded by the table's backbone, but its source {meta.source} is gone: "
            "pass a table embedded from the same backbone as --query instead"
        )
    return embed_image_paths(meta.source, paths, meta)


def load_queries(query: Path, meta: TableMeta, table_name: str) -> tuple[list[str], np.ndarray]:
    """Query names and vectors: an image, a folder of images (embedded as the table was), or a table."""
    if not query.exists():
        raise FileNotFoundError(f"query {query} does not exist")
    if query.suffix == ".parquet" or (query.is_dir() and any(query.glob(PART_GLOB))):
        read_meta(query).check_same_backbone(meta, f"query table {query}", f"embeddings {table_name}")
        table = read_embeddings(query)
        return table.paths, table.vectors
    if query.is_dir():
        paths = scan_images(query)
        if not paths:
            raise SearchError(f"query folder {query} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    elif query.suffix.lower() in IMAGE_EXTENSIONS:
        paths = [str(query)]
    else:
        raise SearchError(f"query {query} is neither an image, a folder of images, nor a .parquet table")
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as err:  # any defect of the file; the backbone never sees it
            raise SearchError(f"query image {path} cannot be read ({type(err).__name__}: {err})") from None
    return paths, _embed_images(paths, meta)


def _results(names: list[str], table: Embeddings, sims: np.ndarray, ids: np.ndarray) -> pa.Table:
    found = ids >= 0  # IVF may find fewer than k in the lists it scans
    rows, ranks = np.nonzero(found)
    hits = ids[found]
    return pa.table(
        {
            "query": pa.array([names[r] for r in rows], pa.string()),
            "rank": pa.array(ranks + 1, pa.int64()),
            "path": pa.array([table.paths[i] for i in hits], pa.string()),
            "label": pa.array(table.labels[hits], pa.int64()),
            "similarity": pa.array(sims[found], pa.float32()),
        }
    )


@dataclass
class SearchResult:
    out: Path
    queries: int
    k: int
    index: str

    def summary(self) -> str:
        return f"wrote {self.out}: {self.k} nearest of {self.queries} queries, {self.index} index"


def search(
    embeddings: Path, query: Path, k: int, out: Path, overwrite: bool = False, index: str = "auto"
) -> SearchResult:
    """Write ``out``/results.csv, results.parquet (query, rank, path, label, similarity) and index.html."""
    embeddings, query, out = Path(embeddings), Path(query), Path(out)
    choose_index(index, 0, 0)  # a misspelt --index fails now, not after the queries are embedded
    refuse_existing(out, overwrite)
    table = read_embeddings(embeddings)
    n = len(table.paths)
    if not 1 <= k <= n:
        raise SearchError(f"--k must be between 1 and the table's {n} images, got {k}")
    names, vectors = load_queries(query, table.meta, str(embeddings))
    kind = choose_index(index, n, len(names))
    sims, ids = build_index(unit_rows(table.vectors, copy=False), kind).search(unit_rows(vectors), k)
    results = _results(names, table, sims, ids)
    shown = min(len(names), PAGE_QUERIES)
    rows = []
    for q in range(shown):
        hits = [(r, float(s), int(i)) for r, (s, i) in enumerate(zip(sims[q], ids[q])) if i >= 0]
        tiles = [Tile(names[q], "query")]
        tiles += [Tile(table.paths[i], f"#{r + 1}  {s:.3f}  label {table.labels[i]}") for r, s, i in hits]
        rows.append(GalleryRow(names[q], tiles))
    intro = (
        f"{len(names)} queries against {n} images of {embeddings} ({table.meta.describe()}); "
        f"{k} nearest by cosine similarity, {kind} index"
        + (f"; the first {shown} queries shown, all in results.csv" if shown < len(names) else "")
    )
    with output_dir(out, overwrite) as tmp:
        pq.write_table(results, tmp / "results.parquet")
        pacsv.write_csv(results, tmp / "results.csv")
        write_gallery_page(tmp / "index.html", "sopvit search", intro, rows)
    return SearchResult(out, len(names), k, kind)
