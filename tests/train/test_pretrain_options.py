"""Every pre-training option is exercised where its value shows in the result.

Each entry trains the tiny run for two steps with one option changed and compares the final student,
teacher and memories with the same run at the tiny defaults: an option that must matter has to change
them (an option the code ignored, or read from the wrong field, fails here), an option that must not
matter (workers, logging, where files go) has to leave them identical to the bit. What each option does
is pinned by the behaviour tests (test_step_behaviour.py, tests/methods/sop, tests/data); this file makes sure
none is silently dropped, and the completeness test makes every future option join the table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.config import ConfigError, load_config
from sopvit.recipe.config import pretrain_config_type
from sopvit.train.trainer import Trainer
from tests.train.tiny import TINY, tiny_config

FASHION = "/usr/share/datasets/fashion-mnist"
STEPS = "train.max_steps=2"
# The baselines with few prototypes and no frozen prototype layer, so two steps move every part of them.
IBOT = ("method=ibot", "ibot.out_dim=64", "ibot.freeze_last_layer=0")
DINO = ("method=dino", "dino.out_dim=64", "dino.freeze_last_layer=0")

# (option, overrides, context shared with the baseline run). The context makes an option observable
# where the tiny defaults hide it (a warm-up between two equal temperatures changes nothing).
CHANGES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("model.arch", ("model.arch=vit_demo",), ()),
    ("model.patch_size", ("model.patch_size=8",), ()),
    ("model.embed_dim", ("model.embed_dim=48",), ()),
    ("model.depth", ("model.depth=3",), ()),
    ("model.num_heads", ("model.num_heads=4",), ()),
    ("model.drop_path_rate", ("model.drop_path_rate=0.2",), ()),
    ("model.head_hidden_dim", ("model.head_hidden_dim=48",), ()),
    ("model.head_bottleneck_dim", ("model.head_bottleneck_dim=16", "sop.dim=16"), ()),
    ("model.head_layers", ("model.head_layers=2",), ()),
    ("data.dataset", ("data.dataset=folder", "data.path={folder}"), ()),
    ("data.in_chans", ("data.in_chans=3",), ()),
    ("data.global_size", ("data.global_size=20",), ()),
    ("data.local_size", ("data.local_size=12",), ()),
    ("data.n_locals", ("data.n_locals=3",), ()),
    ("data.global_scale", ("data.global_scale=[0.6,1.0]",), ()),
    ("data.local_scale", ("data.local_scale=[0.2,0.3]",), ()),
    ("data.blur_sigma", ("data.blur_sigma=[1.5,2.0]",), ()),
    ("data.mask_ratio", ("data.mask_ratio=[0.1,0.5]",), ()),
    ("data.mask_prob", ("data.mask_prob=0.5",), ()),
    ("data.augment_on", ("data.augment_on=device",), ()),
    ("data.limit", ("data.limit=96",), ()),
    ("sop.dim", ("sop.dim=16", "model.head_bottleneck_dim=16"), ()),
    ("sop.cls_bank_size", ("sop.cls_bank_size=48",), ()),
    ("sop.patch_bank_size", ("sop.patch_bank_size=64",), ()),
    ("sop.cls_tasks", ("sop.cls_tasks=2",), ()),
    ("sop.cls_anchors", ("sop.cls_anchors=12",), ()),
    ("sop.cls_k", ("sop.cls_k=3",), ()),
    ("sop.cls_keep_fraction", ("sop.cls_keep_fraction=1.0",), ()),
    ("sop.patch_anchors", ("sop.patch_anchors=12",), ()),
    ("sop.patch_k", ("sop.patch_k=2",), ()),
    ("sop.patch_keep_fraction", ("sop.patch_keep_fraction=0.5",), ()),
    ("sop.smoothing", ("sop.smoothing=0.3",), ()),
    ("sop.student_temp", ("sop.student_temp=0.2",), ()),
    ("sop.anchor_selection", ("sop.anchor_selection=low_cv",), ()),
    ("sop.patch_loss_weight", ("sop.patch_loss_weight=0.5",), ()),
    ("sop.koleo_weight", ("sop.koleo_weight=0.1",), ()),
    ("sop.seed", ("sop.seed=1",), ()),
    ("train.epochs", ("train.epochs=3",), ()),
    ("train.max_steps", ("train.max_steps=3",), ()),
    ("train.batch_size", ("train.batch_size=8",), ()),
    ("train.accum_steps", ("train.accum_steps=2",), ()),
    ("train.lr", ("train.lr=1e-3",), ()),
    ("train.min_lr", ("train.min_lr=1e-4",), ("train.warmup_epochs=0",)),  # no effect during warm-up
    ("train.warmup_epochs", ("train.warmup_epochs=0.25",), ()),
    ("train.weight_decay", ("train.weight_decay=0.2",), ()),
    ("train.weight_decay_end", ("train.weight_decay_end=0.1",), ()),
    ("train.momentum", ("train.momentum=0.99",), ()),
    ("train.momentum_end", ("train.momentum_end=0.998",), ()),
    ("train.teacher_temp", ("train.teacher_temp=0.07",), ()),
    (
        "train.warmup_teacher_temp",
        ("train.warmup_teacher_temp=0.02",),
        ("train.warmup_teacher_temp_epochs=0.5",),
    ),
    (
        "train.warmup_teacher_temp_epochs",
        ("train.warmup_teacher_temp_epochs=1.0",),
        ("train.warmup_teacher_temp=0.02", "train.warmup_teacher_temp_epochs=0.25"),
    ),
    ("train.patch_teacher_temp", ("train.patch_teacher_temp=0.07",), ()),
    ("train.clip_grad", ("train.clip_grad=0",), ()),
    ("train.seed", ("train.seed=1",), ()),
    ("train.precision", ("train.precision=bf16",), ()),
    ("method", ("method=ibot", "ibot.out_dim=64"), ()),
    ("ibot.out_dim", ("ibot.out_dim=48",), IBOT),
    ("ibot.norm_last_layer", ("ibot.norm_last_layer=false",), IBOT),
    ("ibot.student_temp", ("ibot.student_temp=0.2",), IBOT),
    ("ibot.center_momentum", ("ibot.center_momentum=0.5",), IBOT),
    ("ibot.freeze_last_layer", ("ibot.freeze_last_layer=1.0",), IBOT),
    ("ibot.patch_center_momentum", ("ibot.patch_center_momentum=0.5",), IBOT),
    ("ibot.cls_loss_weight", ("ibot.cls_loss_weight=0.5",), IBOT),
    ("ibot.patch_loss_weight", ("ibot.patch_loss_weight=0.5",), IBOT),
    ("dino.out_dim", ("dino.out_dim=48",), DINO),
    ("dino.norm_last_layer", ("dino.norm_last_layer=false",), DINO),
    ("dino.student_temp", ("dino.student_temp=0.2",), DINO),
    ("dino.center_momentum", ("dino.center_momentum=0.5",), DINO),
    ("dino.freeze_last_layer", ("dino.freeze_last_layer=1.0",), DINO),
]

SAME: list[tuple[str, tuple[str, ...]]] = [
    ("data.path", (f"data.path={FASHION}",)),
    ("data.num_workers", ("data.num_workers=2",)),
    ("train.device", ("train.device=cpu",)),
    ("train.precision", ("train.precision=fp32",)),  # what auto means on a CPU
    ("train.on_nan", ("train.on_nan=skip",)),  # no NaN here; NaNs: test_end_to_end.py test_nan_*
    ("train.activation_checkpointing", ("train.activation_checkpointing=true",)),  # recomputed, same
    ("run.output_dir", ("run.output_dir={tmp}/elsewhere",)),
    (
        "run.resume",
        ("run.resume=false",),
    ),  # a fresh folder; an existing run: test_existing_run_is_never_overwritten
    ("run.checkpoint_every", ("run.checkpoint_every=1",)),
    ("run.log_every", ("run.log_every=1",)),
    ("run.knn_every", ("run.knn_every=1", "run.knn_dataset=fashion_mnist", "run.knn_limit=60")),
    ("run.tensorboard", ("run.tensorboard=true",)),
    ("run.progress", ("run.progress=true",)),
]

# Options checked by their own tests below or elsewhere, because two steps of training cannot show them.
ELSEWHERE = {
    "train.compile": "tests/train/test_compile.py (3 compiled steps against eager)",
    "train.parallel": "tests/train/test_fsdp.py (2 sharded ranks against one process, sharded checkpoints)",
    "run.knn_dataset": "test_online_knn_value_depends_on_the_knn_options",
    "run.knn_path": "test_online_knn_value_depends_on_the_knn_options",
    "run.knn_limit": "test_online_knn_value_depends_on_the_knn_options",
    "run.stop_signals": "tests/train/test_stop.py and tests/faults/test_signals.py",
}


def _fingerprint(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoint.pt")
    return {
        f"{part}.{key}": value
        for part in ("student", "teacher", "objective")
        for key, value in state[part].items()
        if isinstance(value, torch.Tensor)
    }


def _train(run_dir: Path, overrides: tuple[str, ...], **fill: str) -> dict[str, torch.Tensor]:
    filled = [o.format(**fill) for o in overrides]
    cfg = tiny_config(run_dir, STEPS, *filled)
    Trainer(cfg).fit()
    return _fingerprint(Path(cfg.run.output_dir))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    gen = torch.Generator().manual_seed(0)
    for i in range(64):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (20, 20), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / f"c{i % 2}" / f"{i}.png")
    return root


_BASELINES: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}


def _baseline(tmp_path_factory: pytest.TempPathFactory, context: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if context not in _BASELINES:
        _BASELINES[context] = _train(tmp_path_factory.mktemp("baseline"), context)
    return _BASELINES[context]


@pytest.mark.parametrize(
    ("option", "overrides", "context"), CHANGES, ids=[c[0] + str(i) for i, c in enumerate(CHANGES)]
)
def test_option_changes_the_trained_weights(
    option: str,
    overrides: tuple[str, ...],
    context: tuple[str, ...],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    folder: Path,
) -> None:
    base = _baseline(tmp_path_factory, context)
    changed = _train(tmp_path / "run", (*context, *overrides), folder=str(folder))
    assert not _same(base, changed), f"{option}: {overrides} left every weight and memory unchanged"


@pytest.mark.parametrize(("option", "overrides"), SAME, ids=[s[0] + str(i) for i, s in enumerate(SAME)])
def test_option_leaves_the_trained_weights_identical(
    option: str, overrides: tuple[str, ...], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = _baseline(tmp_path_factory, ())
    assert _same(base, _train(tmp_path / "run", overrides, tmp=str(tmp_path))), f"{option}: {overrides}"


def _knn_rows(run_dir: Path, *overrides: str) -> list[float]:
    cfg = tiny_config(run_dir, STEPS, "run.knn_every=1", "run.knn_dataset=fashion_mnist", *overrides)
    Trainer(cfg).fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["knn_top1"] for r in rows if "knn_top1" in r]


def test_online_knn_value_depends_on_the_knn_options(tmp_path: Path) -> None:
    few = _knn_rows(tmp_path / "few", "run.knn_limit=60")
    assert len(few) == 2 and all(0 <= v <= 100 for v in few)
    assert _knn_rows(tmp_path / "more", "run.knn_limit=150") != few
    assert _knn_rows(tmp_path / "path", "run.knn_limit=60", f"run.knn_path={FASHION}") == few
    with pytest.raises(FileNotFoundError):
        _knn_rows(
            tmp_path / "missing",
            "run.knn_limit=60",
            f"run.knn_path={tmp_path}/nowhere",
            "run.knn_dataset=folder",
        )


def test_every_option_is_in_a_table() -> None:
    listed = {c[0] for c in CHANGES} | {s[0] for s in SAME} | set(ELSEWHERE)
    sections = [s for s in dataclasses.fields(pretrain_config_type()) if s.name != "method"]
    options = {"method"} | {
        f"{section.name}.{f.name}"
        for section in sections
        for f in dataclasses.fields(
            section.type if isinstance(section.type, type) else _section_type(section.name)
        )
    }
    assert options - listed == set(), "new pre-training options need an entry in this file's tables"
    assert listed - options == set(), "the tables name options that no longer exist"


def _section_type(name: str) -> Any:
    return type(getattr(pretrain_config_type()(), name))


def test_the_prototype_dimension_follows_the_head(tmp_path: Path) -> None:
    tiny = [o for o in TINY if not o.startswith("sop.dim=")]
    cfg = load_config(
        pretrain_config_type(), None, [*tiny, "train.max_steps=1", f"run.output_dir={tmp_path}"]
    )
    assert cfg.method == "sop" and cfg.method_config.dim is None and cfg.model.head_bottleneck_dim == 32
    trainer = Trainer(cfg)
    assert (
        trainer.objective.cls_bank.embeddings.shape[1]
        == trainer.objective.patch_bank.embeddings.shape[1]
        == 32
    )
    trainer.fit()
    assert trainer.step == 1


def test_a_prototype_dimension_other_than_the_heads_names_both_values_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(pretrain_config_type(), None, [*TINY, "sop.dim=64"])
    assert err.value.key == "sop.dim"
    assert str(err.value) == (
        "sop.dim: 64 differs from model.head_bottleneck_dim=32 (the head's output width): drop sop.dim, "
        "which follows the head, or set model.head_bottleneck_dim=64"
    )
