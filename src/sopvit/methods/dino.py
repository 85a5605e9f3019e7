"""DINO (Caron et al., 2021) as an :class:`~sopvit.methods.Objective`: the student's [CLS] of every crop
predicts the centred, sharpened teacher [CLS] of the other global view, over ``out_dim`` learnable
prototypes that end the projection head.

The formula is the reference implementation's (``DINOLoss`` in facebookresearch/dino ``main_dino.py``):
``H(t, s) = -sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k``, in float32 (autocast off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sopvit.config.coerce import check
from sopvit.methods.distill import (
    centered_probs,
    check_center,
    check_temperature,
    collapse_metrics,
    cross_view_ce,
    updated_center,
)
from sopvit.methods.interface import HeadPrototypes, ScheduleValues, StudentOutputs, TeacherOutputs, TokenPlan


@dataclass
class DINOConfig:
    """DINO's section (defaults: its ViT-S/16 recipe). Temperatures and their warm-up are the run's
    ``train.teacher_temp`` schedule."""

    out_dim: int = 65536
    norm_last_layer: bool = True  # the prototypes' weight-norm magnitude is fixed at 1
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: float = 1.0  # epochs during which the prototype layer is not updated

    def validate(self) -> None:
        check(self.out_dim >= 2, "out_dim", "must be >= 2")
        check(self.student_temp > 0, "student_temp", "must be > 0")
        check(0 <= self.center_momentum <= 1, "center_momentum", "must be in [0, 1]")
        check(self.freeze_last_layer >= 0, "freeze_last_layer", "must be >= 0 (epochs)")


def learned_head(cfg: DINOConfig) -> HeadPrototypes:
    """DINO and iBOT end the head with ``out_dim`` learnable prototypes."""
    return HeadPrototypes(cfg.out_dim, cfg.norm_last_layer)


def frozen_prototypes(cfg: DINOConfig) -> dict[str, float]:
    """The prototype layer is frozen for ``freeze_last_layer`` epochs while the rest settles."""
    return {"head.last_layer.": cfg.freeze_last_layer}


def cls_distillation_loss(
    student_cls: Tensor,
    teacher_cls: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """DINO's loss (iBOT's [CLS] term): mean cross-entropy over every (teacher view, other student view).

    Args:
        student_cls: (C * B, K) student logits, crop-major: rows ``[v * B, (v + 1) * B)`` are crop v of
            ``[global1, global2, local1, ..., local(C - 2)]``; C >= 2.
        teacher_cls: (2 * B, K) teacher logits of the two global crops, crop-major ``[global1, global2]``.
        center: (1, K) running centre of the teacher logits.
        student_temp: student temperature tau_s (0.1 in DINO and iBOT).
        teacher_temp: teacher temperature tau_t at this epoch.

    Returns:
        float32 scalar: ``1 / (2 (C - 1)) * sum_{q in {0, 1}} sum_{v != q} mean_b H(t_{q, b}, s_{v, b})``.
    """
    if student_cls.ndim != 2 or teacher_cls.ndim != 2:
        raise ValueError(
            f"student_cls and teacher_cls must be 2-D (rows, K), got shapes {tuple(student_cls.shape)} "
            f"and {tuple(teacher_cls.shape)}"
        )
    k = teacher_cls.shape[1]
    if student_cls.shape[1] != k:
        raise ValueError(f"student_cls has K={student_cls.shape[1]} but teacher_cls has K={k}")
    n_teacher = teacher_cls.shape[0]
    if n_teacher == 0 or n_teacher % 2 != 0:
        raise ValueError(f"teacher_cls must hold 2 * B rows (two global crops, B >= 1), got {n_teacher}")
    batch = n_teacher // 2
    n_student = student_cls.shape[0]
    if n_student % batch != 0 or n_student < n_teacher:
        raise ValueError(
            f"student_cls must hold C * B rows with C >= 2 crops and B = {batch}, got {n_student} rows"
        )
    check_center(center, k)
    check_temperature("student_temp", student_temp)
    check_temperature("teacher_temp", teacher_temp)
    n_crops = n_student // batch

    with torch.autocast(device_type=student_cls.device.type, enabled=False):
        teacher = centered_probs(teacher_cls, center, teacher_temp).view(2, batch, k)
        log_student = (student_cls.float() / student_temp).log_softmax(dim=-1).view(n_crops, batch, k)
        return cross_view_ce(list(log_student), list(teacher))


class DINOObjective(nn.Module):
    """DINO: the student's [CLS] of every crop predicts the centred, sharpened teacher [CLS] of the other
    global view. State: the [CLS] center (a buffer, checkpointed)."""

    masks_student: bool = False

    def __init__(self, cfg: DINOConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DINOConfig()
        self.center: torch.Tensor
        self.register_buffer("center", torch.zeros(1, self.cfg.out_dim))

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        return TokenPlan(teacher=torch.zeros_like(masks))  # [CLS] only

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = cls_distillation_loss(
            student.cls, teacher.cls, self.center, self.cfg.student_temp, values.teacher_temp
        )
        metrics = {"loss_cls": loss.detach(), "loss": loss.detach()}
        return loss, metrics | collapse_metrics(centered_probs(teacher.cls, self.center, values.teacher_temp))

    @torch.no_grad()
    def after_update(self, teachers: Sequence[TeacherOutputs]) -> None:
        cls = torch.cat([t.cls.float() for t in teachers])
        self.center.copy_(updated_center(self.center, cls, self.cfg.center_momentum))
