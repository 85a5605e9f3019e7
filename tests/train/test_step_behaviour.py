"""What one training step does, checked against the rule itself rather than against another run.

Run-vs-run tests (resume, 2 ranks) cannot notice a bug that both runs share: these pin the memory update,
the EMA, per-parameter clipping, which tokens feed the patch loss and the scheduled values, each against
an independent computation from the weights before the step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.data.pipeline import Batch
from sopvit.models import StudentTeacher
from sopvit.optim.groups import set_schedule
from sopvit.train.step import train_step
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(tiny_config(run_dir, *overrides))


def _first_batches(trainer: Trainer, n: int = 1) -> list[Batch]:
    return list(trainer.inputs.batches(0, n, trainer.device))


def _record_calls(obj: Any, name: str, calls: list[dict[str, Any]]) -> None:
    """Wrap ``obj.name`` so that each call's arguments (by name, tensors cloned) are appended to ``calls``."""
    original: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import inspect

        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in bound.arguments.items()})
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def _record_applied_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Gradients as the optimizer sees them (after clipping), filled at each ``optimizer.step``."""
    applied: dict[str, torch.Tensor] = {}
    optimizer, named = trainer.optimizer, list(trainer.model.student.named_parameters())
    original = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        applied.update({n: p.grad.clone() for n, p in named if p.grad is not None})
        return original(*args, **kwargs)

    optimizer.step = step  # type: ignore[method-assign]
    return applied


@torch.no_grad()
def _encode(model: StudentTeacher, part: str, crops: list[torch.Tensor], masks: torch.Tensor | None) -> Any:
    """Full forward (every token through the head) of the two global crops, batched as training does."""
    return getattr(model, part)(torch.cat(crops[:2]), masks)


def test_memories_receive_the_teachers_second_view_before_the_ema(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    (batch,) = _first_batches(trainer)
    b = batch.crops[0].shape[0]
    before = copy.deepcopy(trainer.model)
    objective = trainer.objective
    cls_start, patch_start = objective.cls_bank.pointer, objective.patch_bank.pointer
    untouched_cls = objective.cls_bank.embeddings.clone()
    masks = batch.masks.flatten(1)
    saved = objective.token_generator.get_state()
    key_tokens = objective.memory_tokens(b, masks.shape[1])
    objective.token_generator.set_state(saved)

    train_step(trainer.ctx, [batch], trainer.schedules.at(0), 0)

    teacher = _encode(before, "teacher", batch.crops, None)
    second = slice(b, 2 * b)
    rows = slice(cls_start, cls_start + b)
    torch.testing.assert_close(objective.cls_bank.embeddings[rows], teacher["cls"][second], atol=1e-5, rtol=0)
    expected_keys = teacher["patch"][second][torch.arange(b), key_tokens]
    prow = slice(patch_start, patch_start + b)
    torch.testing.assert_close(objective.patch_bank.embeddings[prow], expected_keys, atol=1e-5, rtol=0)
    assert torch.equal(objective.cls_bank.sample_ids[rows], batch.ids)
    assert torch.equal(objective.patch_bank.sample_ids[prow], batch.ids)
    assert (objective.cls_bank.pointer, objective.patch_bank.pointer) == (cls_start + b, patch_start + b)
    # nothing else in the memory moved
    outside = torch.ones(objective.cls_bank.size, dtype=torch.bool)
    outside[rows] = False
    assert torch.equal(objective.cls_bank.embeddings[outside], untouched_cls[outside])


def test_teacher_is_the_ema_of_the_updated_student_with_the_scheduled_momentum(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.momentum=0.9", "train.momentum_end=1.0", "train.warmup_epochs=0")
    (batch,) = _first_batches(trainer)
    values = trainer.schedules.at(0)
    assert values.momentum == pytest.approx(0.9)
    teacher_before = copy.deepcopy(trainer.model.teacher.state_dict())
    student_before = copy.deepcopy(trainer.model.student.state_dict())
    set_schedule(trainer.optimizer, values.lr, values.weight_decay)  # as the trainer does before a step

    train_step(trainer.ctx, [batch], values, 0)

    student_after = trainer.model.student.state_dict()
    moved = 0
    for name, t_after in trainer.model.teacher.named_parameters():
        if name == "backbone.mask_token":  # the teacher never sees masked inputs: not averaged
            assert torch.equal(t_after, teacher_before[name])
            continue
        expected = torch.lerp(teacher_before[name], student_after[name], 1 - values.momentum)
        torch.testing.assert_close(t_after, expected, atol=1e-7, rtol=1e-6, msg=name)
        moved += int(not torch.equal(student_after[name], student_before[name]))
    assert moved > 10  # the student did change, so the check above is not vacuous


def test_each_gradient_is_clipped_to_clip_grad_on_its_own(tmp_path: Path) -> None:
    # Two identical trainers (same seed, same first batch): one without clipping gives the raw gradients.
    raw_trainer = _trainer(tmp_path / "raw", "train.clip_grad=0")
    raw = _record_applied_grads(raw_trainer)
    train_step(raw_trainer.ctx, _first_batches(raw_trainer), raw_trainer.schedules.at(0), 0)
    norms = {n: float(g.norm()) for n, g in raw.items()}
    clip = float(torch.tensor(list(norms.values())).median())

    trainer = _trainer(tmp_path / "clipped", f"train.clip_grad={clip}")
    applied = _record_applied_grads(trainer)
    train_step(trainer.ctx, _first_batches(trainer), trainer.schedules.at(0), 0)

    assert applied.keys() == raw.keys()
    clipped = 0
    for name, grad in applied.items():
        assert float(grad.norm()) <= clip * (1 + 1e-5), name
        if norms[name] <= clip:
            torch.testing.assert_close(grad, raw[name], atol=1e-6, rtol=1e-5, msg=name)
        else:
            clipped += 1
            torch.testing.assert_close(grad, raw[name] * (clip / norms[name]), atol=1e-6, rtol=1e-4, msg=name)
    assert 0 < clipped < len(applied)


def test_only_masked_tokens_of_the_global_crops_feed_the_patch_loss(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    (batch,) = _first_batches(trainer)
    masks = batch.masks.flatten(1)
    assert masks.any() and not masks.all()
    before = copy.deepcopy(trainer.model)
    calls: list[dict[str, Any]] = []
    _record_calls(trainer.objective, "loss", calls)

    train_step(trainer.ctx, [batch], trainer.schedules.at(0), 0)

    (call,) = calls
    student = _encode(before, "student", batch.crops, batch.masks)
    teacher = _encode(before, "teacher", batch.crops, None)
    assert call["student_tokens"].shape[0] == int(masks.sum())
    torch.testing.assert_close(call["student_tokens"], student["patch"][masks], atol=1e-5, rtol=0)
    torch.testing.assert_close(call["teacher_tokens"], teacher["patch"][masks], atol=1e-5, rtol=0)
    assert torch.equal(call["token_image"], masks.nonzero()[:, 0])
    assert call["n_images"] == masks.shape[0]
    # [CLS]: the student's for every crop in order, the teacher's for the two (unmasked) global crops
    b = batch.crops[0].shape[0]
    torch.testing.assert_close(call["student_cls"][: 2 * b], student["cls"], atol=1e-5, rtol=0)
    torch.testing.assert_close(call["teacher_cls"], teacher["cls"], atol=1e-5, rtol=0)
    with torch.no_grad():
        local = before.student(list(batch.crops[2:]))
    torch.testing.assert_close(
        call["student_cls"][2 * b :], torch.cat([o["cls"] for o in local]), atol=1e-5, rtol=0
    )


def _expected_schedule(step: int) -> dict[str, float]:
    """The tiny run below, from the formulas: 8 steps an epoch, 2 epochs, lr scaled by 16/256."""
    total, warmup = 16, 4
    peak, min_lr = 5e-4 * 16 / 256, 1e-6
    if step < warmup:
        lr = peak * step / warmup
    else:
        lr = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    half_cos = 1 + math.cos(math.pi * step / total)
    return {
        "lr": lr,
        "weight_decay": 0.4 + 0.5 * (0.04 - 0.4) * half_cos,
        "momentum": 1.0 + 0.5 * (0.99 - 1.0) * half_cos,
        "teacher_temp": 0.02 + (0.06 - 0.02) * step / 4 if step < 4 else 0.06,
        "patch_teacher_temp": 0.05,
    }


def test_each_step_uses_the_scheduled_lr_weight_decay_momentum_and_temperatures(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path,
        "train.max_steps=6",
        "train.momentum=0.99",
        "train.warmup_teacher_temp=0.02",
        "train.teacher_temp=0.06",
        "train.warmup_teacher_temp_epochs=0.5",
        "train.patch_teacher_temp=0.05",
    )
    groups: list[list[tuple[float, float, bool]]] = []
    optimizer, original_step = trainer.optimizer, trainer.optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        groups.append([(g["lr"], g["weight_decay"], g["apply_wd"]) for g in optimizer.param_groups])
        return original_step(*args, **kwargs)

    optimizer.step = step  # type: ignore[method-assign]
    losses: list[dict[str, Any]] = []
    emas: list[dict[str, Any]] = []
    _record_calls(trainer.objective, "loss", losses)
    _record_calls(trainer.model, "update_teacher", emas)

    trainer.fit()

    assert len(groups) == len(losses) == len(emas) == 6
    for s in range(6):
        want = _expected_schedule(s)
        for lr, wd, decayed in groups[s]:
            assert lr == pytest.approx(want["lr"], rel=1e-9, abs=1e-15)
            assert wd == pytest.approx(want["weight_decay"] if decayed else 0.0, rel=1e-9)
        assert emas[s]["momentum"] == pytest.approx(want["momentum"], rel=1e-12)
        assert losses[s]["teacher_temp"] == pytest.approx(want["teacher_temp"], rel=1e-12)
        assert losses[s]["patch_teacher_temp"] == pytest.approx(want["patch_teacher_temp"], rel=1e-12)
    rows = [r for r in _metrics(tmp_path) if "lr" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]  # run.log_every=2
    for row in rows:  # the logged schedule is the one the step used
        want = _expected_schedule(row["step"] - 1)
        for key in ("lr", "weight_decay", "momentum", "teacher_temp"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-15), key
    # the checkpoint's documented contents (format 2): what a resumed run and the loaders read
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {
        "format_version",
        "step",
        "config",
        "arch",
        "student",
        "teacher",
        "optimizer",
        "objective",
    } <= set(state)
    assert state["step"] == 6 and state["arch"] == "vit_test" and state["skipped_files"] == 0
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"torch", "numpy", "python", "cuda"}


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_accumulated_micro_batches_all_reach_the_memory_after_the_update(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.accum_steps=2")
    first, second = _first_batches(trainer, 2)
    b = first.crops[0].shape[0]
    calls: list[dict[str, Any]] = []
    _record_calls(trainer.objective, "update_memory", calls)
    start = trainer.objective.cls_bank.embeddings.clone()
    seen: list[torch.Tensor] = []
    loss = trainer.objective.loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(trainer.objective.cls_bank.embeddings.clone())
        return loss(*args, **kwargs)

    trainer.objective.loss = spy  # type: ignore[method-assign]
    train_step(trainer.ctx, [first, second], trainer.schedules.at(0), 0)
    # both micro-batches are scored against the memory as it was before the step
    assert len(seen) == 2 and all(torch.equal(m, start) for m in seen)
    assert [c["sample_ids"].tolist() for c in calls] == [first.ids.tolist(), second.ids.tolist()]
    assert trainer.objective.cls_bank.pointer == 2 * b
