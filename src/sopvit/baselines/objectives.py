"""DINO and iBOT as :class:`sopvit.methods.Objective` s: learnable prototypes at the end of the head,
teacher centering, [CLS] self-distillation across views, and (iBOT) masked-token self-distillation."""

from __future__ import annotations

import math

import torch
from torch import nn

from sopvit.baselines.config import DINOConfig, IBOTConfig
from sopvit.baselines.losses import cls_distillation_loss, masked_patch_distillation_loss, updated_center
from sopvit.methods.interface import StudentOutputs, TeacherOutputs, TokenPlan
from sopvit.train.schedules import ScheduleValues


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


def _collapse_metrics(
    teacher_cls: torch.Tensor, center: torch.Tensor, temp: float
) -> dict[str, torch.Tensor]:
    """SOP's diagnostics for the teacher's [CLS] targets (2B, K): prototype usage and target sharpness,
    both normalised by log K (usage 1: all prototypes used evenly; sharpness 0: one-hot targets)."""
    with torch.no_grad():
        p = torch.softmax((teacher_cls.float() - center) / temp, dim=-1)
        log_k = math.log(p.shape[-1])
        return {"proto_entropy": _entropy(p.mean(0)) / log_k, "teacher_entropy": _entropy(p).mean() / log_k}


class DINOObjective(nn.Module):
    """DINO: the student's [CLS] of every crop predicts the centred, sharpened teacher [CLS] of the other
    global view. State: the [CLS] center (a buffer, checkpointed)."""

    masks_student: bool = False

    def __init__(self, cfg: DINOConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DINOConfig()
        self.head_prototypes: int | None = self.cfg.out_dim
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
        return loss, metrics | _collapse_metrics(teacher.cls, self.center, values.teacher_temp)

    @torch.no_grad()
    def after_update(self, teacher: TeacherOutputs) -> None:
        self.center.copy_(updated_center(self.center, teacher.cls.float(), self.cfg.center_momentum))


class IBOTObjective(DINOObjective):
    """iBOT: DINO's [CLS] loss plus, for each global view, the student's masked tokens predicting the
    teacher's tokens at the same positions of the unmasked view, through the same (shared) head. State: the
    [CLS] and patch centers. The teacher's head sees every token: the patch center averages them all."""

    masks_student: bool = True

    def __init__(self, cfg: IBOTConfig | None = None) -> None:
        cfg = cfg or IBOTConfig()
        super().__init__(cfg)
        self.ibot = cfg  # self.cfg, typed as the iBOT config
        self.patch_center: torch.Tensor
        self.register_buffer("patch_center", torch.zeros(1, self.ibot.out_dim))

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        return TokenPlan(teacher=torch.ones_like(masks))

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.ibot
        loss_cls = cls_distillation_loss(
            student.cls, teacher.cls, self.center, cfg.student_temp, values.teacher_temp
        )
        loss_patch = masked_patch_distillation_loss(
            student.tokens,
            teacher.at_masks(),
            teacher.masks.nonzero()[:, 0],
            teacher.masks.shape[0],
            self.patch_center,
            cfg.student_temp,
            values.patch_teacher_temp,
        )
        loss = cfg.cls_loss_weight * loss_cls + cfg.patch_loss_weight * loss_patch
        metrics = {"loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach(), "loss": loss.detach()}
        return loss, metrics | _collapse_metrics(teacher.cls, self.center, values.teacher_temp)

    @torch.no_grad()
    def after_update(self, teacher: TeacherOutputs) -> None:
        super().after_update(teacher)
        n_images = teacher.masks.shape[0]
        per_image = teacher.tokens.float().view(n_images, -1, self.ibot.out_dim).mean(dim=1)
        self.patch_center.copy_(updated_center(self.patch_center, per_image, self.ibot.patch_center_momentum))
