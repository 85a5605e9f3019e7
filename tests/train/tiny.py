"""A pre-training config small enough to run a few steps in seconds on a CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sopvit.config import load_config
from sopvit.export.load import read_run, teacher_encoder
from sopvit.models import Backbone
from sopvit.recipe.config import PretrainConfig, pretrain_config_type
from sopvit.train.trainer import Trainer

TINY = [
    "model.arch=vit_test",
    "model.drop_path_rate=0.0",
    "model.head_hidden_dim=64",
    "model.head_bottleneck_dim=32",
    "data.dataset=fashion_mnist",
    "data.limit=128",
    "data.in_chans=1",
    "data.global_size=16",
    "data.local_size=8",
    "data.n_locals=2",
    "data.num_workers=0",
    "sop.dim=32",
    "sop.cls_bank_size=64",
    "sop.patch_bank_size=48",
    "sop.cls_anchors=8",
    "sop.cls_k=2",
    "sop.patch_anchors=16",
    "train.epochs=2",
    "train.batch_size=16",
    "train.warmup_epochs=0.5",
    "run.checkpoint_every=3",
    "run.log_every=2",
    "run.progress=false",
    "run.tensorboard=false",
]


def tiny_config(run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_config(pretrain_config_type(), None, [*TINY, f"run.output_dir={run_dir}", *overrides])


def edit_batches(trainer: Any, edit: Callable[[int, Any], None]) -> None:
    """Make the trainer's input stream call ``edit(micro_batch_index, batch)`` on each batch it serves."""
    clean = trainer.inputs.batches

    def edited(start: int, stop: int, device: torch.device) -> Iterator[Any]:
        for m, batch in enumerate(clean(start, stop, device), start):
            edit(m, batch)
            yield batch

    trainer.inputs.batches = edited


def poison(trainer: Any, micro_batch: int) -> None:
    """A NaN pixel in micro-batch ``micro_batch`` of the trainer's stream."""

    def nan(m: int, batch: Any) -> None:
        if m == micro_batch:
            batch.crops[0][0, 0, 0, 0] = float("nan")

    edit_batches(trainer, nan)


def tiny_run(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The run directory of one tiny training step."""
    path = tmp_path_factory.mktemp(name) / "run"
    Trainer(tiny_config(path, "train.max_steps=1")).fit()
    return path


def tiny_teacher(run_dir: Path) -> Backbone:
    state, cfg, _ = read_run(run_dir)
    return teacher_encoder(state, cfg).backbone
