"""`sopvit dedup`: planted duplicates (exact copies, slight perturbations, a chain) are found as groups and
nothing else is, and a threshold outside (0, 1] or an existing output is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sopvit.cli import main
from sopvit.explore.dedup import components, dedup, find_groups
from sopvit.explore.search import unit_rows
from tests.explore.test_search import color_images, write_table

DIM = 48


def planted(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, list[set[int]]]:
    """Random unit vectors (pairwise cosine about +-0.15 in 48-d) with duplicates planted among them."""
    vectors = unit_rows(rng.standard_normal((n, DIM)))

    def near(i: int, scale: float) -> np.ndarray:
        return unit_rows(vectors[i : i + 1] + rng.standard_normal((1, DIM)).astype(np.float32) * scale)[0]

    vectors[7] = vectors[3]  # an exact copy
    vectors[250] = vectors[3]  # and another, far away in the table
    vectors[11] = near(10, 0.02)  # cosine ~0.99
    vectors[390] = near(100, 0.02)
    # a chain: 20 ~ 21 ~ 22 each above the threshold, 20 and 22 below it
    direction = unit_rows(rng.standard_normal((1, DIM)))[0]
    step = direction - vectors[20] * float(direction @ vectors[20])
    step /= np.linalg.norm(step)
    for j, angle in ((21, 0.25), (22, 0.5)):
        vectors[j] = np.cos(angle) * vectors[20] + np.sin(angle) * step
    return vectors, [{3, 7, 250}, {10, 11}, {20, 21, 22}, {100, 390}]


@pytest.mark.parametrize(("index", "n"), [("exact", 400), ("ivf", 5000)])
def test_planted_duplicates_are_found_and_nothing_else(index: str, n: int) -> None:
    vectors, expected = planted(np.random.default_rng(0), n)  # IVF: 128 lists, 16 of them probed
    assert float(vectors[20] @ vectors[22]) < 0.9 < float(vectors[20] @ vectors[21])
    groups, kind = find_groups(vectors, 0.95, index)
    assert kind == index
    assert [set(g.tolist()) for g in groups] == expected
    assert all(list(g) == sorted(g) for g in groups)  # table order: the first member is the earliest row


def test_threshold_one_still_joins_exact_copies() -> None:
    vectors, _ = planted(np.random.default_rng(1))
    groups, _ = find_groups(vectors, 1.0, "exact")
    assert [g.tolist() for g in groups] == [[3, 7, 250]]


def test_components_follow_chains_in_any_order() -> None:
    first = np.array([9, 1, 5, 2, 7])
    second = np.array([8, 2, 4, 3, 9])
    root = components(10, first, second)
    assert root.tolist() == [0, 1, 1, 1, 4, 4, 6, 7, 7, 7]
    assert components(3, np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == [0, 1, 2]


def test_dedup_writes_groups_csv_and_a_page(tmp_path: Path) -> None:
    vectors, expected = planted(np.random.default_rng(2))
    paths = color_images(tmp_path / "images", len(vectors))
    table = write_table(tmp_path / "e.parquet", vectors, paths)
    result = dedup(table, 0.95, tmp_path / "out", index="exact")
    assert (result.groups, result.images) == (4, 10) and "4 groups" in result.summary()
    csv = pd.read_csv(tmp_path / "out" / "groups.csv")
    assert list(csv.columns) == ["group", "path", "label", "similarity"]
    assert csv["group"].tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    assert [{paths.index(p) for p in csv[csv["group"] == g]["path"]} for g in (1, 2, 3, 4)] == expected
    firsts = csv.groupby("group")["similarity"].first()
    assert np.allclose(firsts, 1.0, atol=1e-6) and csv["similarity"].iloc[:3].tolist() == [1.0, 1.0, 1.0]
    chain = csv[csv["group"] == 3]["similarity"].tolist()
    assert chain[1] > 0.95 > 0.9 > chain[2]  # the chain's far end is in the group below the threshold
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert page.count("<section>") == 4 and page.count("<img ") == 10 and "group 1: 3 images" in page


def test_no_duplicates_gives_empty_outputs(tmp_path: Path) -> None:
    vectors = unit_rows(np.random.default_rng(3).standard_normal((50, DIM)))
    table = write_table(tmp_path / "e.parquet", vectors)
    result = dedup(table, 0.95, tmp_path / "out")
    assert (result.groups, result.images, result.index) == (0, 0, "exact")
    assert len(pd.read_csv(tmp_path / "out" / "groups.csv")) == 0


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = str(
        write_table(tmp_path / "e.parquet", unit_rows(np.random.default_rng(4).standard_normal((8, DIM))))
    )
    out = str(tmp_path / "out")
    for threshold in ("0", "-0.5", "1.01", "nan"):
        assert main(["dedup", "--embeddings", table, "--threshold", threshold, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err
            == f"sopvit: error: --threshold must be in (0, 1] (a cosine similarity), got {float(threshold)}"
        )
    assert main(["dedup", "--embeddings", table, "--out", out]) == 0
    assert "no near-duplicates found" in capsys.readouterr().out
    assert main(["dedup", "--embeddings", table, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("out already exists: pass --overwrite to replace it")
    assert main(["dedup", "--embeddings", table, "--out", out, "--overwrite"]) == 0
    assert main(["dedup", "--embeddings", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o2")]) == 2
    assert "none.parquet do not exist" in capsys.readouterr().err
