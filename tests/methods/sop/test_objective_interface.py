"""SOPObjective as the training step sees it: plan_tokens, compute_loss and after_update.

The plan selects the student's masked tokens plus one memory key per image of the second global view; the
loss from the head outputs of the planned tokens is the composition of the public loss functions; after the
update the memories hold the second view's [CLS] and key tokens with the data-set ids.
"""

from __future__ import annotations

import pytest
import torch

import sopvit.methods.sop.memory_bank as memory_bank_module
from sopvit import SOPObjective
from sopvit.methods.interface import ScheduleValues, StudentOutputs, TeacherOutputs, TokenPlan
from tests.methods.sop.test_objective import SMALL, _batch, composed_losses

B, LENGTH = 3, 5  # 2B = 6 images of 5 tokens: B, 2B and L all differ


def _key_tokens(b: int = B, length: int = LENGTH) -> torch.Tensor:
    """The first draw of the objective's token generator (seeded seed + 1): one token per image."""
    return torch.randint(length, (b,), generator=torch.Generator().manual_seed(SMALL.seed + 1))


def _masks() -> torch.Tensor:
    # unequal masked counts per image (3, 1, 0, 2, 5, 1): the per-image averaging matters
    rows = [
        [1, 1, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 1, 0, 0],
    ]
    return torch.tensor(rows, dtype=torch.bool)


def _outputs(
    objective: SOPObjective, batch: dict[str, torch.Tensor], ids: torch.Tensor
) -> tuple[StudentOutputs, TeacherOutputs]:
    """Head outputs of the planned tokens, as the training step hands them over."""
    masks = batch["masks"]
    plan = objective.plan_tokens(masks)
    student = StudentOutputs(cls=batch["student_cls"], tokens=batch["student_patch"][masks])
    teacher = TeacherOutputs(
        cls=batch["teacher_cls"], tokens=batch["teacher_patch"][plan.teacher], masks=masks, plan=plan, ids=ids
    )
    return student, teacher


def _values(teacher_temp: float, patch_teacher_temp: float) -> ScheduleValues:
    return ScheduleValues(
        step=0,
        lr=1e-3,
        weight_decay=0.04,
        momentum=0.996,
        teacher_temp=teacher_temp,
        patch_teacher_temp=patch_teacher_temp,
    )


def test_plan_selects_the_masked_tokens_and_one_key_per_second_view_image() -> None:
    objective = SOPObjective(SMALL)
    masks = _masks()
    plan = objective.plan_tokens(masks)
    assert isinstance(plan, TokenPlan)
    keys = torch.zeros(2 * B, LENGTH, dtype=torch.bool)
    keys[torch.arange(B, 2 * B), _key_tokens()] = True  # second view only: images B..2B-1
    assert plan.state.dtype == torch.bool and torch.equal(plan.state, keys)
    assert plan.teacher.dtype == torch.bool and torch.equal(plan.teacher, masks | keys)
    assert plan.state[:B].sum() == 0 and plan.state[B:].sum(dim=1).tolist() == [1] * B


def test_plan_keys_are_the_tokens_forward_sends_to_the_patch_memory() -> None:
    planned, forwarded = SOPObjective(SMALL), SOPObjective(SMALL)
    batch = _batch(b=B, length=LENGTH)
    keys = planned.plan_tokens(batch["masks"]).state
    forwarded(**batch, teacher_temp=0.04)
    torch.testing.assert_close(
        forwarded.patch_bank.embeddings[:B], batch["teacher_patch"][keys].reshape(B, SMALL.dim)
    )


def test_compute_loss_is_the_composition_of_the_public_functions() -> None:
    objective = SOPObjective(SMALL)
    gen = torch.Generator()
    gen.set_state(objective.generator.get_state())
    cls_bank, patch_bank = objective.cls_bank.embeddings.clone(), objective.patch_bank.embeddings.clone()
    batch = _batch(b=B, length=LENGTH) | {"masks": _masks()}
    student, teacher = _outputs(objective, batch, torch.tensor([4, 5, 6]))
    loss, metrics = objective.compute_loss(student, teacher, _values(0.04, 0.07))

    expected_cls, expected_patch = composed_losses(cls_bank, patch_bank, gen, batch, 0.04, 0.07)

    torch.testing.assert_close(metrics["loss_cls"], expected_cls)
    torch.testing.assert_close(metrics["loss_patch"], expected_patch)
    torch.testing.assert_close(loss, expected_cls + expected_patch)
    torch.testing.assert_close(metrics["loss"], loss.detach())


def test_compute_loss_equals_forward_on_the_dense_tensors() -> None:
    via_step, via_forward = SOPObjective(SMALL), SOPObjective(SMALL)
    batch = _batch(b=B, length=LENGTH, seed=4) | {"masks": _masks()}
    student, teacher = _outputs(via_step, batch, torch.tensor([1, 2, 3]))
    loss, metrics = via_step.compute_loss(student, teacher, _values(0.05, 0.03))
    expected, expected_metrics = via_forward(
        **batch, teacher_temp=0.05, patch_teacher_temp=0.03, update_memory=False
    )
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        torch.testing.assert_close(metrics[key], value)


def test_after_update_enqueues_the_second_view_and_its_key_tokens_with_ids() -> None:
    objective = SOPObjective(SMALL)
    batch = _batch(b=B, length=LENGTH, seed=5) | {"masks": _masks()}
    ids = torch.tensor([11, 12, 13])
    _, teacher = _outputs(objective, batch, ids)
    objective.after_update([teacher])
    rows = torch.arange(B)
    torch.testing.assert_close(objective.cls_bank.embeddings[:B], batch["teacher_cls"][B:])
    torch.testing.assert_close(
        objective.patch_bank.embeddings[:B], batch["teacher_patch"][B:][rows, _key_tokens()]
    )
    for bank in (objective.cls_bank, objective.patch_bank):
        assert bank.sample_ids[:B].tolist() == [11, 12, 13]
        assert bank.sample_ids[B:].eq(-1).all()
        assert bank.pointer == B


def test_update_memory_promises_equal_counts_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both memories enqueue with ``same_size=True``: every rank holds B rows, no count exchange."""
    seen: list[bool] = []

    def gather(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
        seen.append(same_size)
        return x

    monkeypatch.setattr(memory_bank_module, "all_gather_rows", gather)
    objective = SOPObjective(SMALL)
    batch = _batch(b=B, length=LENGTH)
    objective(**batch, teacher_temp=0.04, sample_ids=torch.tensor([1, 2, 3]))
    assert seen == [True] * 4  # keys and ids of the [CLS] memory, then of the patch memory
