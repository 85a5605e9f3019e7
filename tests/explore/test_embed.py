"""`sopvit embed`: the table holds the evaluators' features of every readable image, reads in pandas, polars
and DuckDB, resumes after an interruption, and refuses in one line what it must not mix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sopvit.explore.embed as embed_module
from sopvit.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from sopvit.cli import main
from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.data.shard_writer import write_shards
from sopvit.eval.cache import extract_dataset_features
from sopvit.explore.embed import EmbedOptions, EmbedResult, embed, embed_image_paths
from sopvit.explore.model import head_space
from sopvit.explore.table import Embeddings, read_embeddings
from sopvit.export import load_pretrained
from sopvit.export.load import load_teacher_encoder
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config

N = 24
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("embed") / "run"
    Trainer(tiny_config(path, "train.max_steps=1")).fit()
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 Fashion-MNIST test images as PNGs (lossless: shards of them decode alike) in 3 class folders."""
    root = tmp_path_factory.mktemp("images") / "images"
    images, labels = load_fashion_mnist("test", limit=N)
    for i in range(N):
        (root / f"class{int(labels[i]) % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy()).save(root / f"class{int(labels[i]) % 3}" / f"{i:03d}.png")
    return root


def _embed(run_dir: Path, data: Path | str, out: Path, **options: Any) -> EmbedResult:
    return embed(EmbedOptions(str(run_dir), str(data), str(out), num_workers=0, **options))


@pytest.fixture(scope="module")
def table(run_dir: Path, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EmbedResult]:
    """The folder embedded with the defaults; tests only read it."""
    out = tmp_path_factory.mktemp("table") / "embeddings.parquet"
    return out, _embed(run_dir, folder, out, part_size=10)


def _same(a: Embeddings, b: Embeddings) -> None:
    assert a.paths == b.paths and a.meta == b.meta
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.head is not None and b.head is not None
    np.testing.assert_array_equal(a.head, b.head)


def test_the_table_reads_in_pandas_polars_and_duckdb(folder: Path, table: tuple[Path, EmbedResult]) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    out, result = table
    assert (result.rows, result.unreadable, result.computed) == (N, 0, N)
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["path", "label", "embedding", "head"] and len(frame) == N
    expected = {str(p): int(p.parent.name[-1]) for p in folder.rglob("*.png")}  # class0..2 -> 0..2
    assert dict(zip(frame["path"], frame["label"], strict=True)) == expected
    polars = pl.read_parquet(f"{out}/*.parquet")
    assert polars.height == N and polars["embedding"].dtype.size == 32
    query = (
        f"SELECT count(*), count(DISTINCT label), max(len(embedding)) FROM read_parquet('{out}/*.parquet')"
    )
    assert duckdb.sql(query).fetchall() == [(N, 3, 32)]
    rows = read_embeddings(out)
    np.testing.assert_allclose(np.linalg.norm(rows.vectors, axis=1), 1, atol=1e-5)
    assert rows.head is not None
    np.testing.assert_allclose(np.linalg.norm(rows.head, axis=1), 1, atol=1e-5)


def test_vectors_are_the_evaluators_features(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    backbone = load_pretrained(run_dir)

    def reference(feature: str) -> torch.Tensor:
        return extract_dataset_features(
            backbone, "folder", str(folder), "train", 16, 1, 8, None, CPU, feature
        )[0]

    both = reference("cls+avgpool")  # [CLS] then the mean patch token, as cache._forward concatenates them
    cls = both[:, : backbone.embed_dim]
    with torch.no_grad():
        head = head_space(load_teacher_encoder(run_dir).head, cls).numpy()
    for feature, normalize, dtype in (
        ("cls", True, "float32"),
        ("cls+avgpool", False, "float32"),
        ("last2", True, "float32"),
        ("cls", False, "float16"),
    ):
        out = tmp_path / f"{feature}-{normalize}-{dtype}.parquet"
        _embed(run_dir, folder, out, feature=feature, normalize=normalize, dtype=dtype, batch_size=5)
        got = read_embeddings(out)
        kind = pq.read_schema(next(out.glob("part-*"))).field("embedding").type.value_type
        assert str(kind) == {"float32": "float", "float16": "halffloat"}[dtype]
        ref = {"cls": cls, "cls+avgpool": both}.get(feature)
        ref = reference(feature) if ref is None else ref
        ref = F.normalize(ref, dim=-1) if normalize else ref
        tol = 1e-5 if dtype == "float32" else 2e-3 * float(ref.abs().max())  # float16 keeps 11 bits
        assert np.abs(got.vectors - ref.numpy()).max() < tol, feature
        # the head column is the teacher head of the final [CLS], whichever feature the table holds
        assert got.head is not None and np.abs(got.head - head).max() < 1e-5, feature


def test_shards_give_the_folders_rows(
    run_dir: Path, folder: Path, table: tuple[Path, EmbedResult], tmp_path: Path
) -> None:
    write_shards(folder, tmp_path / "shards", per_shard=10)
    by_folder = read_embeddings(table[0])
    for data in (tmp_path / "shards", tmp_path / "shards" / "shard-{000000..000002}.tar"):
        out = tmp_path / f"shards-{len(str(data))}.parquet"
        _embed(run_dir, data, out)
        by_shards = read_embeddings(out)
        assert all(".tar:" in p for p in by_shards.paths)
        np.testing.assert_array_equal(by_shards.labels, by_folder.labels)
        np.testing.assert_allclose(by_shards.vectors, by_folder.vectors, atol=1e-6)


def test_a_rerun_continues_after_the_last_complete_part(
    run_dir: Path,
    folder: Path,
    table: tuple[Path, EmbedResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = read_embeddings(table[0])  # the same rows, written in parts of 10 by one uninterrupted run
    written: list[str] = []
    real = embed_module.write_part

    def stop_at_third(path: Path, *args: Any) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C would, while the third part is being written
        written.append(path.name)
        real(path, *args)

    out = tmp_path / "t.parquet"
    monkeypatch.setattr(embed_module, "write_part", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        _embed(run_dir, folder, out, part_size=5)
    assert not out.exists()  # a partial table is never readable as the whole one
    partial = tmp_path / "t.parquet.partial"
    assert sorted(p.name for p in partial.glob("part-*")) == written
    (partial / ".part-000-00002.parquet.tmp-999").write_bytes(b"half a file")

    written.clear()
    monkeypatch.setattr(
        embed_module, "write_part", lambda path, *a: (written.append(path.name), real(path, *a))
    )
    assert _embed(run_dir, folder, out, part_size=5).computed == N - 10
    assert written == [f"part-000-0000{j}.parquet" for j in (2, 3, 4)]
    _same(read_embeddings(out), whole)
    assert not partial.exists() and not list(out.glob(".*tmp*"))

    (out / "part-000-00004.parquet").unlink()  # a lost part of a finished table is recomputed alone
    written.clear()
    assert _embed(run_dir, folder, out, part_size=5).computed == 4
    assert written == ["part-000-00004.parquet"]
    _same(read_embeddings(out), whole)
    assert _embed(run_dir, folder, out, part_size=5).computed == 0


def test_unreadable_images_are_listed_and_never_rows(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    data = Path(shutil.copytree(folder, tmp_path / "data"))
    (data / "zbad").mkdir()  # sorts last: with 8 rows a part, the last part is of bad files only
    (data / "zbad" / "garbage.png").write_bytes(b"not an image")
    good = next((data / "class1").glob("*.png")).read_bytes()
    (data / "zbad" / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "t.parquet"
    result = _embed(run_dir, data, out, part_size=8)
    assert (result.rows, result.unreadable) == (N, 2)
    assert pq.read_metadata(out / "part-000-00003.parquet").num_rows == 0
    listed = (out / "_unreadable.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [
        str(data / "zbad" / "garbage.png"),
        str(data / "zbad" / "truncated.png"),
    ]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in listed)
    table = read_embeddings(out)
    assert len(table.paths) == N and not any("zbad" in p for p in table.paths)


def test_an_export_gives_the_runs_vectors_without_a_head(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    from sopvit.export import export

    export(run_dir, "safetensors", tmp_path / "export")
    _embed(run_dir, folder, tmp_path / "run.parquet")
    _embed(tmp_path / "export", folder, tmp_path / "export.parquet")
    by_run, by_export = (
        read_embeddings(tmp_path / "run.parquet"),
        read_embeddings(tmp_path / "export.parquet"),
    )
    assert by_export.head is None and by_export.meta.head_dim is None
    assert by_export.meta.fingerprint == by_run.meta.fingerprint
    np.testing.assert_allclose(by_export.vectors, by_run.vectors, atol=1e-6)
    # query images embedded as the table was (what sopvit search does with image queries)
    some = by_run.paths[:3]
    vectors = embed_image_paths(by_run.meta.source, some, by_run.meta, device="cpu")
    np.testing.assert_allclose(vectors, by_run.vectors[:3], atol=1e-5)


@pytest.fixture(scope="module")
def other_run(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run with other teacher weights: another backbone, for what must not mix with the first."""
    path = tmp_path_factory.mktemp("other") / "run"
    path.mkdir()
    state = load_checkpoint(run_dir / "checkpoint.pt")
    state["teacher"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in state["teacher"].items()}
    save_checkpoint({k: v for k, v in state.items() if k != "format_version"}, path / "checkpoint.pt")
    return path


def _refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(["embed", *argv, "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sopvit: error: "), err
    return err


def test_refusals_are_one_line(
    run_dir: Path, other_run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.parquet"
    assert main(["embed", "--checkpoint", str(run_dir), "--data", str(folder), "--out", str(out)]) == 0
    assert f"wrote {N} rows" in capsys.readouterr().out
    first = read_embeddings(out).meta.fingerprint
    err = _refusal(capsys, "--checkpoint", str(other_run), "--data", str(folder), "--out", str(out))
    assert "--overwrite" in err and first in err and "fingerprint" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = _refusal(
        capsys, "--checkpoint", str(run_dir), "--data", str(folder), "--out", str(notes), "--overwrite"
    )
    assert "not an embeddings table" in err and notes.read_text() == "mine"
    (tmp_path / "empty").mkdir()
    err = _refusal(capsys, "--checkpoint", str(run_dir), "--data", str(tmp_path / "empty"), "--out", str(out))
    assert "no image files" in err
    err = _refusal(capsys, "--checkpoint", str(tmp_path / "nope"), "--data", str(folder), "--out", str(out))
    assert "does not exist" in err
    mine = tmp_path / "mine.parquet.partial"  # the name of a run's work folder, but not left by one
    (mine / "keep").mkdir(parents=True)
    err = _refusal(
        capsys, "--checkpoint", str(run_dir), "--data", str(folder), "--out", str(mine)[:-8], "--overwrite"
    )
    assert "not an interrupted sopvit embed" in err and (mine / "keep").is_dir()
    shutil.rmtree(mine)
    argv = ["embed", "--checkpoint", str(other_run), "--data", str(folder), "--out", str(out), "--overwrite"]
    assert main(argv) == 0
    assert read_embeddings(out).meta.fingerprint != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt", "t.parquet"]


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_single_process_table(
    run_dir: Path, folder: Path, table: tuple[Path, EmbedResult], tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = tmp_path / "two.parquet"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = ["--checkpoint", str(run_dir), "--data", str(folder), "--part-size", "5", "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, "-m", "sopvit", "embed", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.glob("part-*")) == [
        f"part-00{r}-0000{j}.parquet" for r in (0, 1) for j in (0, 1, 2)
    ]
    two, one = read_embeddings(out), read_embeddings(table[0])
    assert sorted(two.paths) == sorted(one.paths) and two.meta == one.meta
    a, b = np.argsort(two.paths), np.argsort(one.paths)
    np.testing.assert_array_equal(two.labels[a], one.labels[b])
    np.testing.assert_allclose(two.vectors[a], one.vectors[b], atol=1e-5)
    assert two.head is not None and one.head is not None
    np.testing.assert_allclose(two.head[a], one.head[b], atol=1e-5)
