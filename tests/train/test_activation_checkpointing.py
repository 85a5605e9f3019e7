"""``train.activation_checkpointing=true`` recomputes the student's block activations in backward and
changes nothing else: same losses, gradients and weights, drop path included (its RNG is replayed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sopvit.train.trainer import Trainer
from tests.train.test_fsdp import _record
from tests.train.tiny import tiny_config


def _run(run_dir: Path, *flags: str) -> tuple[Trainer, dict[str, float], list[dict[str, torch.Tensor]]]:
    trainer = Trainer(tiny_config(run_dir, "train.max_steps=3", "model.drop_path_rate=0.3", *flags))
    grads = _record(trainer)
    return trainer, trainer.fit(), grads


def test_checkpointing_changes_no_number(tmp_path: Path) -> None:
    plain, plain_row, plain_grads = _run(tmp_path / "plain")
    ckpt, ckpt_row, ckpt_grads = _run(tmp_path / "ckpt", "train.activation_checkpointing=true")
    assert (
        ckpt.model.student.backbone.grad_checkpointing and not ckpt.model.teacher.backbone.grad_checkpointing
    )
    assert ckpt_row["loss"] == plain_row["loss"]
    for step, (a, b) in enumerate(zip(ckpt_grads, plain_grads, strict=True)):
        for name, grad in b.items():
            assert torch.equal(a[name], grad), (step, name)
    for key, value in plain.model.teacher.state_dict().items():
        assert torch.equal(ckpt.model.teacher.state_dict()[key], value), key


def test_checkpointing_recomputes_each_student_block(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.activation_checkpointing=true"))
    calls = []
    for block in trainer.model.student.backbone.model.blocks:
        attn = block.attn.forward
        block.attn.forward = lambda *a, f=attn, **k: calls.append(1) or f(*a, **k)
    batch = next(trainer.inputs.batches(0, 1, trainer.device))
    with torch.no_grad():  # no graph, nothing to recompute
        trainer.student([batch.crops[0]])
    assert len(calls) == 2
    out = trainer.student([batch.crops[0]])[0]
    out["cls"].sum().backward()
    assert len(calls) == 2 + 2 * 2  # forward, then each block again in backward


@pytest.mark.parametrize("flag", ["true", "false"])
def test_the_flag_is_validated_like_any_bool(tmp_path: Path, flag: str) -> None:
    cfg = tiny_config(tmp_path, f"train.activation_checkpointing={flag}")
    assert cfg.train.activation_checkpointing is (flag == "true")
