"""Cosine search with FAISS: exact (IndexFlatIP) against IVF (IndexIVFFlat), as ``sopvit search`` builds them.

    python benchmarks/search.py [--quick] [--sizes 1000000,5000000] [--queries 10000] [--json out.json]

Synthetic 384-d float32 vectors (ViT-S/16's width), L2-normalised, from a Gaussian mixture in a 64-d
subspace (``--centers`` unit centres, in-cluster spread ``--noise`` times a centre's length) plus a little
isotropic 384-d noise (:class:`Mixture`); queries come from the same mixture. For each size:

- ``build``: seconds to make the index as ``sopvit.explore.search.build_index`` does, without generating
  the data: for exact, copying the vectors in; for IVF, two-level k-means on ``TRAIN_PER_LIST`` points a
  list + assigning every vector to one of about 4 sqrt(N) lists;
- ``1 query``: median latency of single-vector searches, k=10;
- ``queries``: seconds for one batch of ``--queries`` (k=10);
- ``recall@10``: the fraction of the exact top 10 that IVF returns, per nprobe;
- memory: the index's own bytes and the process's resident set after the build.

The table vectors are generated in chunks straight into the index (5M x 384 float32 is 7.7 GB: no second
copy); the exact index is freed before IVF is built, whose vectors are regenerated from the same seeds.
``--quick``: 100k and 300k vectors, 1000 queries. Timings are wall-clock on all of faiss's threads.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sopvit.explore.search import TRAIN_PER_LIST, ivf_lists, trained_ivf, unit_rows

DIM = 384
LATENT = 64  # intrinsic dimension of the synthetic embeddings
AMBIENT = 0.1  # length of the isotropic 384-d noise: about 3% of a point's length before normalising
CHUNK = 250_000
NPROBES = (1, 4, 8, 16, 32, 64)


@dataclass
class Mixture:
    """Unit vectors of a Gaussian mixture in a ``LATENT``-d subspace, plus a little isotropic noise.

    Image embeddings are clustered and of low intrinsic dimension (tens, not 384): an isotropic 384-d
    mixture would be either trivial for IVF (tight clusters) or have no meaningful neighbours at all.
    """

    centers: np.ndarray  # (count, LATENT), unit rows
    noise: float  # in-cluster spread, relative to a centre's length
    basis: np.ndarray  # (LATENT, DIM)

    @classmethod
    def make(cls, count: int, noise: float, seed: int = 0) -> Mixture:
        rng = np.random.default_rng(seed)
        centers = unit_rows(rng.standard_normal((count, LATENT), dtype=np.float32))
        return cls(centers, noise, rng.standard_normal((LATENT, DIM), dtype=np.float32))

    def chunks(self, n: int, seed: int) -> Iterator[np.ndarray]:
        """The ``n`` vectors of ``seed``, chunk by chunk: each chunk seeded by its first row, so any
        chunk is the same however the rows are walked."""
        spread = np.float32(self.noise / math.sqrt(LATENT))
        for first in range(0, n, CHUNK):
            rng = np.random.default_rng([seed, first])
            size = min(CHUNK, n - first)
            latent = self.centers[rng.integers(0, len(self.centers), size)]
            latent += rng.standard_normal((size, LATENT), dtype=np.float32) * spread
            rows = latent @ self.basis / np.float32(math.sqrt(LATENT))
            rows += rng.standard_normal((size, DIM), dtype=np.float32) * np.float32(AMBIENT / math.sqrt(DIM))
            yield unit_rows(rows)


def rss_gb() -> tuple[float, float]:
    """Resident set now and at its peak, GB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1e6, int(fields["VmHWM"].split()[0]) / 1e6


def latency(index: faiss.Index, queries: np.ndarray, repeat: int) -> float:
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        index.search(queries[i : i + 1], 10)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(chunks: Iterator[np.ndarray], spent: list[float]) -> Iterator[np.ndarray]:
    """``chunks``, adding the seconds spent making each to ``spent[0]``: generating the synthetic table
    is no part of building its index."""
    while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        spent[0] += time.perf_counter() - start
        if chunk is None:
            return
        yield chunk


def exact_index(data: Mixture, n: int) -> tuple[faiss.Index, float]:
    """The ``IndexFlatIP`` that ``build_index(..., "exact")`` makes, filled chunk by chunk in place: its
    storage is sized once (grown by chunks it would double, copying all 7.7 GB at 5M)."""
    start, making = time.perf_counter(), [0.0]
    index = faiss.IndexFlatIP(DIM)
    index.codes.resize(n * DIM * 4)
    table = faiss.rev_swig_ptr(index.codes.data(), n * DIM * 4).view(np.float32).reshape(n, DIM)
    at = 0
    for chunk in timed(data.chunks(n, seed=1), making):
        table[at : at + len(chunk)] = chunk
        at += len(chunk)
    index.ntotal = n
    return index, time.perf_counter() - start - making[0]


def ivf_index(data: Mixture, n: int) -> tuple[faiss.IndexIVFFlat, float, float]:
    """``build_index(..., "ivf")``'s index, trained on the table's first rows (i.i.d. draws: a random
    sample) and filled chunk by chunk, without the whole table in memory beside it; with the seconds
    spent on k-means and on assigning the vectors to lists."""
    making = [0.0]
    wanted, head = min(n, TRAIN_PER_LIST * ivf_lists(n)), list[np.ndarray]()
    chunks = timed(data.chunks(n, seed=1), making)
    while sum(len(h) for h in head) < wanted:
        head.append(next(chunks))
    start = time.perf_counter()
    index = trained_ivf(np.concatenate(head)[:wanted], ivf_lists(n))
    train = time.perf_counter() - start
    making[0] = 0.0
    for chunk in itertools.chain(head, chunks):
        index.add(chunk)
    del head
    return index, train, time.perf_counter() - start - train - making[0]


def run_size(n: int, data: Mixture, queries: np.ndarray, repeat: int) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n, "queries": len(queries)}
    index, row["exact_build_s"] = exact_index(data, n)
    row["exact_index_gb"] = index.ntotal * DIM * 4 / 1e9
    row["exact_rss_gb"] = rss_gb()[0]
    row["exact_1q_ms"] = 1000 * latency(index, queries, repeat)
    start = time.perf_counter()
    _, truth = index.search(queries, 10)
    row["exact_batch_s"] = time.perf_counter() - start
    del index
    gc.collect()
    print(f"  exact: {row}", flush=True)
    ivf, row["ivf_train_s"], row["ivf_add_s"] = ivf_index(data, n)
    row["ivf_build_s"] = row["ivf_train_s"] + row["ivf_add_s"]
    row["nlist"] = ivf.nlist
    row["ivf_index_gb"] = (ivf.ntotal * (DIM * 4 + 8) + ivf.nlist * DIM * 4) / 1e9
    row["ivf_rss_gb"] = rss_gb()[0]
    row["nprobe"] = {}
    for nprobe in NPROBES:
        ivf.nprobe = nprobe
        one = 1000 * latency(ivf, queries, repeat * 5)
        start = time.perf_counter()
        _, found = ivf.search(queries, 10)
        batch = time.perf_counter() - start
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
        row["nprobe"][nprobe] = {"1q_ms": one, "batch_s": batch, "recall10": recall}
        print(f"  ivf nprobe {nprobe}: {row['nprobe'][nprobe]}", flush=True)
    del ivf
    gc.collect()
    row["peak_rss_gb"] = rss_gb()[1]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line for the exact index, one per nprobe for IVF (build: k-means + assignment)."""
    batch = {r["queries"] for r in rows}
    lines = [
        f"| N | index | build s | 1 query ms | {'/'.join(map(str, batch))} queries s | recall@10 | "
        "index GB | RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | exact | {r['exact_build_s']:.1f} | {r['exact_1q_ms']:.1f} | "
            f"{r['exact_batch_s']:.1f} | 1 | {r['exact_index_gb']:.2f} | {r['exact_rss_gb']:.2f} |"
        )
        for nprobe, m in r["nprobe"].items():
            lines.append(
                f"| {r['n']:,} | IVF{r['nlist']} nprobe {nprobe} | "
                f"{r['ivf_train_s']:.1f} + {r['ivf_add_s']:.1f} | {m['1q_ms']:.2f} | {m['batch_s']:.2f} | "
                f"{m['recall10']:.3f} | {r['ivf_index_gb']:.2f} | {r['ivf_rss_gb']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100k and 300k vectors, 1000 queries")
    parser.add_argument("--sizes", help="comma-separated table sizes (default 1000000,5000000)")
    parser.add_argument("--queries", type=int, help="batch size (default 10000)")
    parser.add_argument("--centers", type=int, default=1000, help="mixture components (default 1000)")
    parser.add_argument("--noise", type=float, default=1.0, help="noise length / centre length (1)")
    parser.add_argument("--repeat", type=int, default=10, help="single-query searches timed (median)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    default_sizes = "100000,300000" if args.quick else "1000000,5000000"
    sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    count = args.queries or (1000 if args.quick else 10_000)
    data = Mixture.make(args.centers, args.noise)
    queries = np.concatenate(list(data.chunks(count, seed=2)))
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    rows = []
    for n in sizes:
        print(f"N = {n:,}", flush=True)
        rows.append(run_size(n, data, queries, args.repeat))
        print(format_table(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
