"""FSDP runs write sharded checkpoints (``checkpoint-NNNNNN/``, named by ``checkpoint.latest``). Every
consumer of a run reads one directly, from the run directory or the folder itself, gathering the teacher
into whole tensors: the loaders give the teacher the trainer held, ``sopvit export`` writes what it writes
for a ``checkpoint.pt`` run holding the same state, and ``eval``, ``visualize``, ``embed`` and
``prototypes assign`` give that run's results. A run directory that is broken is refused in one line."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from sopvit.checkpoints.checkpoint import CheckpointError, save_checkpoint
from sopvit.checkpoints.run_dir import read_checkpoint
from sopvit.checkpoints.sharded import read_meta
from sopvit.cli import main
from sopvit.explore.model import load_embedder
from sopvit.explore.table import read_embeddings
from sopvit.export import load_pretrained
from sopvit.export.load import load_teacher_encoder, read_run
from sopvit.train.trainer import Trainer
from sopvit.visualize.attention import load_run, load_teacher_backbone
from tests.gloo import run_gloo_ranks
from tests.train.tiny import tiny_config

STEP = 3
FOLDER = f"checkpoint-{STEP:06d}"
PARTS = ("student", "teacher", "objective")


@dataclass
class ShardedRun:
    run: Path  # written by train.parallel=fsdp
    ranks: int
    held: dict[str, dict[str, Any]]  # the trainer's own student, teacher and objective, gathered
    twin: Path  # a checkpoint.pt run holding the same state
    placed: set[str]  # the types of the trainer's teacher parameters (DTensor: sharded across ranks)

    @property
    def folder(self) -> Path:
        return self.run / FOLDER

    @property
    def teacher(self) -> dict[str, Any]:
        return self.held["teacher"]

    def part(self, prefix: str) -> dict[str, Any]:
        """The teacher's entries under ``prefix`` (``backbone.``, ``head.``), keyed as that module's own."""
        return {k[len(prefix) :]: v for k, v in self.teacher.items() if k.startswith(prefix)}


def _gathered(state: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()) if torch.is_tensor(v) else v
        for k, v in state.items()
    }


def _train(rank: int, run: Path, out: Path, overrides: tuple[str, ...]) -> None:
    trainer = Trainer(tiny_config(run, "train.parallel=fsdp", f"train.max_steps={STEP}", *overrides))
    trainer.fit()
    model = trainer.model
    held = {"student": model.student.state_dict(), "teacher": model.teacher.state_dict()}
    held = {name: _gathered(state) for name, state in held.items()}  # a collective under FSDP
    held["objective"] = _gathered(trainer.objective.state_dict())
    if rank == 0:
        torch.save({"held": held, "placed": {type(p).__name__ for p in model.teacher.parameters()}}, out)


def _make(factory: pytest.TempPathFactory, ranks: int) -> ShardedRun:
    root = factory.mktemp(f"sharded_{ranks}")
    run, out = root / "run", root / "held.pt"
    if ranks == 1:
        _train(0, run, out, ())
    else:  # the same global batch of 16
        run_gloo_ranks(_train, ranks, run, out, ("train.batch_size=8",))
    saved = torch.load(out, weights_only=False)
    twin = root / "twin"
    twin.mkdir()
    save_checkpoint({**read_meta(run / FOLDER), **saved["held"], "optimizer": {}}, twin / "checkpoint.pt")
    return ShardedRun(run, ranks, saved["held"], twin, saved["placed"])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> ShardedRun:
    return _make(tmp_path_factory, 1)


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["1rank", "2ranks"])
def sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ShardedRun:
    if request.param == 1:
        return request.getfixturevalue("one_rank")
    return _make(tmp_path_factory, request.param)


def _same(got: Mapping[str, Any], want: Mapping[str, Any], what: str) -> None:
    """Equal keys and exactly equal values (tensors bit for bit, nested state such as RNG states too)."""
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if isinstance(value, Mapping):
            _same(got[key], value, f"{what}.{key}")
        elif torch.is_tensor(value):
            assert torch.equal(got[key], value), f"{what}: {key}"
        else:
            assert got[key] == value, f"{what}: {key}"


def test_the_run_is_sharded(sharded: ShardedRun) -> None:
    assert (sharded.run / "checkpoint.latest").read_text().strip() == FOLDER
    assert not (sharded.run / "checkpoint.pt").exists()
    assert len(list(sharded.folder.glob("*.distcp"))) == sharded.ranks
    assert (sharded.folder / ".metadata").is_file() and (sharded.folder / "sopvit.pt").is_file()
    if sharded.ranks > 1:
        assert sharded.placed == {"DTensor"}  # each rank held a shard of the teacher: reading gathers it


def test_every_loader_gives_the_trainers_teacher(sharded: ShardedRun) -> None:
    state = read_checkpoint(sharded.folder)
    assert state["step"] == STEP and "optimizer" not in state
    for part in PARTS:
        _same(state[part], sharded.held[part], f"read_checkpoint {part}")
    backbone, head = sharded.part("backbone."), sharded.part("head.")
    for source in (sharded.run, sharded.folder, sharded.folder / "sopvit.pt"):
        state, cfg, path = read_run(source)
        assert path == sharded.folder and cfg.train.parallel == "fsdp" and state["step"] == STEP
        _same(state["teacher"], sharded.teacher, f"read_run({source})")
        loaded = load_pretrained(source)
        assert all(p.requires_grad for p in loaded.parameters())
        _same(loaded.state_dict(), backbone, f"load_pretrained({source})")
        _same(load_teacher_encoder(source).state_dict(), sharded.teacher, f"load_teacher_encoder({source})")
        run = load_run(source)
        assert run.checkpoint == sharded.folder and run.config.train.parallel == "fsdp"
        _same(load_teacher_backbone(run).state_dict(), backbone, f"visualize load_run({source})")
        embedder = load_embedder(source)
        assert embedder.head is not None
        _same(embedder.backbone.state_dict(), backbone, f"load_embedder({source}) backbone")
        _same(embedder.head.state_dict(), head, f"load_embedder({source}) head")


def _export(source: Path, fmt: str, out: Path) -> None:
    assert main(["export", "--checkpoint", str(source), "--format", fmt, "--out", str(out)]) == 0


def _config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    del config["sopvit"]["source_run"]  # the only difference: where each came from
    return config


def test_export_writes_what_a_checkpoint_pt_run_gives(
    sharded: ShardedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for fmt in ("timm", "safetensors", "hf", "onnx"):
        _export(sharded.run, fmt, tmp_path / fmt / "sharded")
        _export(sharded.twin, fmt, tmp_path / fmt / "file")
    _export(sharded.folder, "timm", tmp_path / "timm" / "folder")
    model = sharded.part("backbone.model.")
    for name in ("sharded", "folder"):
        weights = torch.load(tmp_path / "timm" / name / "backbone.pth", weights_only=True)
        _same(weights, model, f"timm export of the {name}")
        args = (tmp_path / "timm" / name / "timm_args.json").read_text()
        assert args == (tmp_path / "timm" / "file" / "timm_args.json").read_text()
    for fmt in ("safetensors", "hf"):
        got, want = tmp_path / fmt / "sharded", tmp_path / fmt / "file"
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
        for weights in ("model.safetensors", "sopvit.safetensors"):
            _same(load_file(got / weights), load_file(want / weights), f"{fmt} {weights}")
        _same(load_file(got / "model.safetensors"), model, f"{fmt} export")
        assert _config(got) == _config(want)
    assert (tmp_path / "hf" / "sharded" / "README.md").read_text() == (
        tmp_path / "hf" / "file" / "README.md"
    ).read_text()
    onnx = tmp_path / "onnx" / "sharded" / "backbone.onnx"
    assert onnx.read_bytes() == (tmp_path / "onnx" / "file" / "backbone.onnx").read_bytes()
    capsys.readouterr()


def _knn(source: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    argv = ["eval", "knn", "--checkpoint", str(source), "image_size=16", "limit=100", "ks=[5]"]
    assert main([*argv, f"cache_dir={cache}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    del result["checkpoint"]
    return result


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "images"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def _embed_and_assign(source: Path, images: Path, out: Path) -> tuple[Any, dict[str, list[Any]]]:
    table = out / "embeddings.parquet"
    argv = ["--data", str(images), "--out", str(table), "--num-workers", "0", "--device", "cpu"]
    assert main(["embed", "--checkpoint", str(source), *argv]) == 0
    argv = ["--embeddings", str(table), "--out", str(out / "assigned")]
    assert main(["prototypes", "assign", "--checkpoint", str(source), *argv]) == 0
    return read_embeddings(table), pq.read_table(out / "assigned" / "assignments.parquet").to_pydict()


def test_eval_visualize_embed_and_assign_read_it(
    sharded: ShardedRun, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _knn(sharded.run, tmp_path / "c1", capsys) == _knn(sharded.twin, tmp_path / "c2", capsys)
    out = tmp_path / "attention.png"
    argv = ["--checkpoint", str(sharded.run), "--image", str(images / "a" / "0.png"), "--out", str(out)]
    assert main(["visualize", "attention", *argv]) == 0 and out.stat().st_size > 0
    gallery = tmp_path / "gallery.png"
    assert main(["visualize", "prototypes", "--checkpoint", str(sharded.run), "--out", str(gallery)]) == 0
    assert gallery.stat().st_size > 0
    table, assigned = _embed_and_assign(sharded.run, images, tmp_path / "sharded")
    want_table, want_assigned = _embed_and_assign(sharded.twin, images, tmp_path / "file")
    assert table.meta.fingerprint == want_table.meta.fingerprint and table.meta.head_dim is not None
    np.testing.assert_array_equal(table.vectors, want_table.vectors)
    np.testing.assert_array_equal(table.head, want_table.head)
    assert assigned == want_assigned and len(assigned["prototype"]) == 6
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ errors
def _remove_folder(run: Path) -> Path:
    shutil.rmtree(run / FOLDER)
    return run


def _remove_meta(run: Path) -> Path:
    (run / FOLDER / "sopvit.pt").unlink()
    return run


def _remove_meta_pass_folder(run: Path) -> Path:
    return _remove_meta(run) / FOLDER


def _no_checkpoint(run: Path) -> Path:
    shutil.rmtree(run / FOLDER)
    (run / "checkpoint.latest").unlink()  # a run stopped before its first save: config.yaml, metrics
    return run


def _truncate_shard(run: Path) -> Path:
    shard = next((run / FOLDER).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    return run


BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "latest_names_a_missing_folder": (
        _remove_folder,
        r"checkpoint\.latest names checkpoint-000003, which does not exist: the run directory was edited",
    ),
    "folder_without_sopvit_pt": (
        _remove_meta,
        r"checkpoint\.latest names checkpoint-000003, which has no sopvit\.pt \(its step, config and RNG",
    ),
    "folder_without_sopvit_pt_passed_itself": (
        _remove_meta_pass_folder,
        r"checkpoint-000003 is an incomplete sharded checkpoint: it has no sopvit\.pt",
    ),
    "neither_format": (_no_checkpoint, r"not a sopvit run directory"),
    "truncated_shard": (_truncate_shard, r"sharded checkpoint \S+checkpoint-000003 is unreadable \(EOFError"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_run_is_refused_in_one_line(
    one_rank: ShardedRun, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    breaks, message = BROKEN[case]
    source = breaks(Path(shutil.copytree(one_rank.run, tmp_path / "run")))
    assert (tmp_path / "run" / "config.yaml").is_file()
    with pytest.raises((CheckpointError, ValueError, FileNotFoundError), match=message):
        load_pretrained(source)
    with pytest.raises((CheckpointError, ValueError, FileNotFoundError), match=message):
        load_teacher_encoder(source)
    out, image = tmp_path / "out", images / "a" / "0.png"
    for argv in (
        ["export", "--checkpoint", str(source), "--format", "timm", "--out", str(out)],
        ["eval", "knn", "--checkpoint", str(source)],
        ["visualize", "attention", "--checkpoint", str(source), "--image", str(image), "--out", str(out)],
        ["embed", "--checkpoint", str(source), "--data", str(images), "--out", str(out)],
    ):
        assert main(argv) in (1, 2), argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sopvit: "), (argv, lines)
        assert re.search(message, lines[0]), (argv, lines[0])
    assert not out.exists()
