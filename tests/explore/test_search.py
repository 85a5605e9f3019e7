"""`sopvit search`: exact search is brute-force cosine top-k, IVF keeps recall on clustered data, the outputs
read in pandas, and every refusal is one line that names what to fix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import sopvit.explore.search as search_module
from sopvit.cli import main
from sopvit.explore.search import (
    IVF_MIN_VECTORS,
    build_index,
    choose_index,
    ivf_lists,
    search,
    unit_rows,
)
from sopvit.explore.table import EmbeddingsError, TableMeta, write_part

DIM = 24


def table_meta(**changes: Any) -> TableMeta:
    base = TableMeta("vit_test", "0123456789abcdef", "/runs/a", "cls", False, DIM, "float32", 16)
    return dataclasses.replace(base, **changes)


def write_table(
    root: Path, vectors: np.ndarray, paths: list[str] | None = None, meta: TableMeta | None = None
) -> Path:
    """A table of two part files, as ``sopvit embed`` writes them."""
    root.mkdir(parents=True)
    n = len(vectors)
    paths = paths or [f"/images/{i:04d}.png" for i in range(n)]
    meta = meta or table_meta(dim=vectors.shape[1])
    half = n // 2
    for part, rows in enumerate([slice(0, half), slice(half, n)]):
        labels = np.arange(n, dtype=np.int64)[rows] % 5
        write_part(root / f"part-000-{part:05d}.parquet", meta, paths[rows], labels, vectors[rows])
    return root


def color_images(folder: Path, n: int) -> list[str]:
    """``n`` small PNGs of distinct colours (real files, so the page has something to show)."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", (24, 24), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)
        paths.append(str(path))
    return paths


def brute_force(table: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    t = table / np.linalg.norm(table, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ t.T.astype(np.float64)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_exact_search_is_brute_force_cosine_top_k() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((600, DIM)).astype(np.float32) * rng.uniform(0.1, 9, (600, 1)).astype(
        np.float32
    )
    queries = rng.standard_normal((40, DIM)).astype(np.float32) * 3
    sims, ids = build_index(unit_rows(table), "exact").search(unit_rows(queries), 7)
    want_sims, want_ids = brute_force(table, queries, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


def test_ivf_keeps_recall_at_10_on_clustered_data() -> None:
    rng = np.random.default_rng(1)
    centers = unit_rows(rng.standard_normal((40, 32)))

    def draw(n: int) -> np.ndarray:
        return unit_rows(
            centers[rng.integers(0, 40, n)] + rng.standard_normal((n, 32)).astype(np.float32) * 0.1
        )

    table, queries = draw(10_000), draw(300)
    index = build_index(table, "ivf")
    assert (
        abs(index.nlist - ivf_lists(10_000)) < 25 and index.nprobe == search_module.NPROBE
    )  # about 4 sqrt(N)
    _, found = index.search(queries, 10)
    _, truth = brute_force(table, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95


def test_auto_takes_ivf_only_where_its_build_pays() -> None:
    big = IVF_MIN_VECTORS * 4
    assert choose_index("auto", 5_000, 5_000) == "exact"  # small tables: exact, however many queries
    assert choose_index("auto", big, 1) == "exact"  # one query scans once: cheaper than clustering
    assert choose_index("auto", big, big) == "ivf"
    assert choose_index("exact", big, big) == "exact" and choose_index("ivf", 10, 1) == "ivf"
    with pytest.raises(ValueError, match="--index must be one of auto, exact, ivf, got 'hnsw'"):
        choose_index("hnsw", 10, 1)


def test_search_writes_csv_parquet_and_a_page(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((30, DIM)).astype(np.float32)
    paths = color_images(tmp_path / "images", 30)
    table = write_table(tmp_path / "e.parquet", vectors, paths)
    queries = write_table(
        tmp_path / "q.parquet", vectors[[3, 17, 29]] + 0.01, [paths[i] for i in (3, 17, 29)]
    )
    result = search(table, queries, 4, tmp_path / "out")
    assert (result.queries, result.k, result.index) == (3, 4, "exact")
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    parquet = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(csv.columns) == list(parquet.columns) == ["query", "rank", "path", "label", "similarity"]
    assert len(csv) == 12 and csv["rank"].tolist() == [1, 2, 3, 4] * 3
    pd.testing.assert_frame_equal(
        csv.drop(columns="similarity"), parquet.drop(columns="similarity"), check_dtype=False
    )
    np.testing.assert_allclose(csv["similarity"], parquet["similarity"], atol=1e-6)
    sims, ids = brute_force(vectors, vectors[[3, 17, 29]] + 0.01, 4)
    assert parquet["path"].tolist() == [paths[i] for i in ids.ravel()]
    assert parquet["label"].tolist() == [int(i) % 5 for i in ids.ravel()]
    np.testing.assert_allclose(parquet["similarity"], sims.ravel(), atol=1e-5)
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert page.count("<section>") == 3 and page.count("<img ") == 15 and "exact index" in page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "index.html",
        "results.csv",
        "results.parquet",
    ]


def test_image_queries_are_embedded_with_the_tables_backbone(tmp_path: Path) -> None:
    from sopvit.explore.embed import EmbedOptions, embed

    export = Path(__file__).parents[1] / "fixtures" / "hf_export_v1"
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):  # 16 px grey noise of varied brightness: the export was trained on 16 px grey images
        pixels = np.clip(rng.normal(20 * i + 10, 40, (16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    table = tmp_path / "e.parquet"
    embed(EmbedOptions(str(export), str(folder), str(table), num_workers=0, device="cpu"))
    one = search(table, folder / "05.png", 3, tmp_path / "one")
    hits = pd.read_parquet(tmp_path / "one" / "results.parquet")
    assert hits["path"][0] == str(folder / "05.png") and hits["similarity"][0] == pytest.approx(1, abs=1e-4)
    assert one.queries == 1 and hits["query"].unique().tolist() == [str(folder / "05.png")]
    search(table, folder, 1, tmp_path / "all")
    every = pd.read_parquet(tmp_path / "all" / "results.parquet")
    assert (every["query"] == every["path"]).all() and len(every) == 12


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, f"not one line: {err}"
    return code, err


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(4)
    table = str(write_table(tmp_path / "e.parquet", rng.standard_normal((10, DIM)).astype(np.float32)))
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        (["--query", table, "--k", "0"], "--k must be between 1 and the table's 10 images, got 0"),
        (["--query", table, "--k", "11"], "got 11"),
        (["--query", str(tmp_path / "nowhere.png")], "nowhere.png does not exist"),
        (["--query", str(tmp_path / "empty")], "empty holds no images"),
        (
            ["--query", str(tmp_path / "bad.jpg")],
            "query image .*bad.jpg cannot be read \\(UnidentifiedImageError",
        ),
        (
            ["--query", str(tmp_path / "notes.txt")],
            "neither an image, a folder of images, nor a .parquet table",
        ),
    ]
    for extra, message in cases:
        code, err = _cli(capsys, "search", "--embeddings", table, "--out", out, "--k", "3", *extra)
        assert code == 2 and err.startswith("sopvit: error: ")
        assert re.search(message, err), err
        assert not Path(out).exists()
    assert _cli(capsys, "search", "--embeddings", table, "--query", table, "--out", out, "--k", "3")[0] == 0
    code, err = _cli(capsys, "search", "--embeddings", table, "--query", table, "--out", out)
    assert code == 2 and err.endswith("out already exists: pass --overwrite to replace it")
    code, _ = _cli(
        capsys, "search", "--embeddings", table, "--query", table, "--out", out, "--k", "2", "--overwrite"
    )
    assert code == 0 and len(pd.read_csv(Path(out) / "results.csv")) == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftovers


def test_a_table_of_another_backbone_is_refused_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors = np.random.default_rng(5).standard_normal((6, DIM)).astype(np.float32)
    table = write_table(tmp_path / "e.parquet", vectors)
    other = write_table(
        tmp_path / "o.parquet", vectors, meta=table_meta(fingerprint="fedcba9876543210", source="/runs/b")
    )
    with pytest.raises(EmbeddingsError) as caught:
        search(table, other, 3, tmp_path / "out")
    message = str(caught.value)
    assert "0123456789abcdef" in message and "fedcba9876543210" in message and "/runs/b" in message
    code, err = _cli(
        capsys,
        "search",
        "--embeddings",
        str(table),
        "--query",
        str(other),
        "--out",
        str(tmp_path / "o"),
        "--k",
        "3",
    )
    assert code == 2 and "fedcba9876543210" in err and "0123456789abcdef" in err


def test_a_failed_write_leaves_the_old_output_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = np.random.default_rng(6).standard_normal((8, DIM)).astype(np.float32)
    table = write_table(tmp_path / "e.parquet", vectors)
    out = tmp_path / "out"
    search(table, table, 2, out)
    before = (out / "results.csv").read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(search_module, "write_gallery_page", broken)
    with pytest.raises(OSError, match="disk full"):
        search(table, table, 3, out, overwrite=True)
    assert (out / "results.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet", "out"]
