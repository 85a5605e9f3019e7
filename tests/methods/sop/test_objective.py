from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from sopvit import SOPObjective, assign, cross_view_loss, masked_patch_loss
from sopvit.methods.sop import Prototypes, SOPConfig, build_prototype_tasks

SMALL = SOPConfig(
    dim=8, cls_bank_size=64, patch_bank_size=32, cls_tasks=2, cls_anchors=8, cls_k=2, patch_anchors=6, seed=3
)


def _batch(b: int = 3, crops: int = 4, length: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, SMALL.dim, generator=g), dim=-1)

    return {
        "student_cls": unit(crops * b),
        "teacher_cls": unit(2 * b),
        "student_patch": unit(2 * b, length),
        "teacher_patch": unit(2 * b, length),
        "masks": torch.rand(2 * b, length, generator=g) < 0.5,
    }


def composed_losses(
    cls_bank: torch.Tensor,
    patch_bank: torch.Tensor,
    gen: torch.Generator,
    batch: dict[str, torch.Tensor],
    teacher_temp: float,
    patch_teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SMALL's [CLS] and patch losses from the public single-task functions, applied task by task with the
    dense contribution matrix Y, on prototypes drawn from the memories with ``gen``."""
    c = build_prototype_tasks(cls_bank, 2, 8, 2, 0.1, 0.5, gen)
    p = build_prototype_tasks(patch_bank, 1, 6, 0, 0.1, 1.0, gen)

    def task(t: int) -> Prototypes:
        return Prototypes(*(getattr(c, f.name)[t] for f in fields(Prototypes)))

    b = batch["teacher_cls"].shape[0] // 2
    per_task = []
    for t in range(2):
        s = assign(batch["student_cls"], task(t), 0.1)
        q = assign(batch["teacher_cls"], task(t), teacher_temp)  # [CLS] targets at the teacher temperature
        per_task.append(cross_view_loss(list(s.split(b)), list(q.split(b))))
    sp = batch["student_patch"] @ p.supports[0].T / 0.1
    tp = batch["teacher_patch"] @ p.supports[0].T / patch_teacher_temp
    # per image: the mean over its masked tokens; then the mean over all images
    patch = masked_patch_loss(
        sp.softmax(-1) @ p.contributions[0], tp.softmax(-1) @ p.contributions[0], batch["masks"]
    )
    return torch.stack(per_task).mean(), patch


def test_loss_equals_the_composition_of_the_public_functions() -> None:
    objective = SOPObjective(SMALL)
    gen = torch.Generator()
    gen.set_state(objective.generator.get_state())
    cls_bank, patch_bank = objective.cls_bank.embeddings.clone(), objective.patch_bank.embeddings.clone()
    batch = _batch()
    loss, metrics = objective(**batch, teacher_temp=0.04, patch_teacher_temp=0.07)

    expected_cls, expected_patch = composed_losses(cls_bank, patch_bank, gen, batch, 0.04, 0.07)

    torch.testing.assert_close(metrics["loss_cls"], expected_cls)
    torch.testing.assert_close(metrics["loss_patch"], expected_patch)
    torch.testing.assert_close(loss, expected_cls + expected_patch)
    for key in ("proto_entropy", "teacher_entropy", "agreement"):
        assert 0.0 <= metrics[key].item() <= 1.0


def test_memory_gets_second_global_view_after_the_loss() -> None:
    objective = SOPObjective(SMALL)
    batch = _batch()
    token = torch.randint(5, (3,), generator=torch.Generator().manual_seed(SMALL.seed + 1))
    objective(**batch, teacher_temp=0.04, sample_ids=torch.tensor([7, 8, 9]))
    torch.testing.assert_close(objective.cls_bank.embeddings[:3], batch["teacher_cls"][3:])
    torch.testing.assert_close(
        objective.patch_bank.embeddings[:3], batch["teacher_patch"][3:][torch.arange(3), token]
    )
    assert objective.cls_bank.sample_ids[:3].tolist() == [7, 8, 9]
    assert objective.cls_bank.pointer == 3 and objective.patch_bank.pointer == 3


def test_gradients_reach_only_student_inputs() -> None:
    objective = SOPObjective(SMALL)
    batch = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in _batch().items()}
    loss, _ = objective(**batch, teacher_temp=0.04)
    loss.backward()
    assert batch["student_cls"].grad is not None and batch["student_patch"].grad is not None
    assert batch["teacher_cls"].grad is None and batch["teacher_patch"].grad is None
    assert all(not b.requires_grad for b in objective.buffers())


def test_state_dict_restores_generator_and_banks() -> None:
    a = SOPObjective(SMALL)
    a(**_batch(seed=1), teacher_temp=0.04)
    b = SOPObjective(SMALL)
    b.load_state_dict(a.state_dict())
    la, _ = a(**_batch(seed=2), teacher_temp=0.04)
    lb, _ = b(**_batch(seed=2), teacher_temp=0.04)
    assert torch.equal(la, lb)
    assert torch.equal(a.cls_bank.embeddings, b.cls_bank.embeddings)


def test_koleo_term_is_added_when_weighted() -> None:
    objective = SOPObjective(SMALL, koleo_weight=0.5)
    loss, metrics = objective(**_batch(), teacher_temp=0.04)
    torch.testing.assert_close(
        loss, metrics["loss_cls"] + metrics["loss_patch"] + 0.5 * metrics["loss_koleo"]
    )


def test_impossible_settings_fail_at_construction() -> None:
    size = SMALL.cls_bank_size
    with pytest.raises(ValueError, match=rf"^cls_anchors must be in \[1, cls_bank_size={size}\], got 100"):
        SOPObjective(SMALL, cls_anchors=100)
    # the construction probe holds anchors + k rows; the message still names the whole memory
    with pytest.raises(ValueError, match=r"^patch_anchors must be in \[1, patch_bank_size=\d+\], got 0$"):
        SOPObjective(SMALL, patch_anchors=0)
    with pytest.raises(ValueError, match=r"^cls prototypes: k must be"):
        SOPObjective(SMALL, cls_k=60)
    # one anchor is in range (the keep fraction then refuses it), and so is a memory that is all anchors
    with pytest.raises(ValueError, match=r"^cls prototypes: keep_fraction"):
        SOPObjective(SMALL, cls_anchors=1)
    SOPObjective(SMALL, patch_anchors=SMALL.patch_bank_size, patch_k=0, patch_keep_fraction=1.0)


def test_shape_mismatches_raise() -> None:
    objective = SOPObjective(SMALL)
    batch = _batch()
    with pytest.raises(ValueError, match="teacher_cls"):
        objective(**(batch | {"teacher_cls": batch["teacher_cls"][:5]}), teacher_temp=0.04)
    with pytest.raises(ValueError, match="masks"):
        objective(**(batch | {"masks": batch["masks"][:, :4]}), teacher_temp=0.04)
