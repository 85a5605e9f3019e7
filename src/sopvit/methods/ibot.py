"""iBOT (Zhou et al., 2022) as an :class:`~sopvit.methods.Objective`: DINO's [CLS] loss plus masked-token
self-distillation through the same (shared) head (``iBOTLoss`` in bytedance/ibot ``main_ibot.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sopvit.config.coerce import check
from sopvit.methods.dino import DINOConfig, DINOObjective, cls_distillation_loss
from sopvit.methods.distill import (
    centered_probs,
    check_center,
    check_temperature,
    collapse_metrics,
    per_image_mean,
    updated_center,
)
from sopvit.methods.interface import ScheduleValues, StudentOutputs, TeacherOutputs, TokenPlan


@dataclass
class IBOTConfig(DINOConfig):
    """iBOT (Zhou et al., 2022): DINO's [CLS] loss plus masked-token self-distillation through the same
    (shared) head; the patch teacher temperature is ``train.patch_teacher_temp`` (null: the [CLS] one)."""

    out_dim: int = 8192
    patch_center_momentum: float = 0.9
    cls_loss_weight: float = 1.0  # iBOT's lambda1
    patch_loss_weight: float = 1.0  # iBOT's lambda2

    def validate(self) -> None:
        super().validate()
        check(0 <= self.patch_center_momentum <= 1, "patch_center_momentum", "must be in [0, 1]")
        check(self.cls_loss_weight >= 0, "cls_loss_weight", "must be >= 0")
        check(self.patch_loss_weight >= 0, "patch_loss_weight", "must be >= 0")


def masked_patch_distillation_loss(
    student_tokens: Tensor,
    teacher_tokens: Tensor,
    token_image: Tensor,
    n_images: int,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """iBOT's masked-image-modelling term, computed from the masked tokens only.

    For the 2B global images (view 1's B images first, then view 2's), the student sees the masked
    image and the teacher the unmasked one; each masked patch token of the student is matched with the
    teacher token at the same position. With ``n_i`` the number of masked tokens of image i:

        loss_i = sum_{masked tokens j of image i} H(t_j, s_j) / max(n_i, 1)     (0 when n_i = 0)
        loss   = mean over the 2 views of (mean over the view's B images of loss_i)

    which is iBOT's ``sum(CE * mask, -1) / mask.sum(-1).clamp(min=1)``, then ``.mean()`` per view, then
    the mean over views: the unmasked tokens of iBOT's (B, L) computation contribute exactly 0. Since both
    views hold B images this is also the plain mean of ``loss_i`` over the 2B images.

    Args:
        student_tokens: (M, K) student logits of the M masked patch tokens.
        teacher_tokens: (M, K) teacher logits at the same positions (of the unmasked view).
        token_image: (M,) int64, the image in ``[0, n_images)`` each token belongs to (not range-checked
            here, to avoid a device sync; an out-of-range id fails in the indexing).
        n_images: 2B, the number of global images (images without a masked token included).
        center: (1, K) running centre of the teacher patch logits.
        student_temp: student temperature tau_s (0.1 in iBOT).
        teacher_temp: teacher patch temperature at this epoch.

    Returns:
        float32 scalar (0 when M = 0, still connected to ``student_tokens`` for backward).
    """
    if student_tokens.ndim != 2 or student_tokens.shape != teacher_tokens.shape:
        raise ValueError(
            f"student_tokens and teacher_tokens must both be (M, K), got {tuple(student_tokens.shape)} "
            f"and {tuple(teacher_tokens.shape)}"
        )
    m, k = student_tokens.shape
    if token_image.shape != (m,) or token_image.dtype != torch.long:
        raise ValueError(
            f"token_image must be int64 of shape ({m},), got {token_image.dtype} {tuple(token_image.shape)}"
        )
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images <= 0 or n_images % 2:
        raise ValueError(f"n_images must be 2 * B (a positive even int), got {n_images!r}")
    check_center(center, k)
    check_temperature("student_temp", student_temp)
    check_temperature("teacher_temp", teacher_temp)

    with torch.autocast(device_type=student_tokens.device.type, enabled=False):
        teacher = centered_probs(teacher_tokens, center, teacher_temp)
        log_student = (student_tokens.float() / student_temp).log_softmax(dim=-1)
        ce = -(teacher * log_student).sum(dim=-1)  # (M,)
        return per_image_mean(ce, token_image, n_images)


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
        return loss, metrics | collapse_metrics(centered_probs(teacher.cls, self.center, values.teacher_temp))

    @torch.no_grad()
    def after_update(self, teachers: Sequence[TeacherOutputs]) -> None:
        super().after_update(teachers)
        per_image = torch.cat(
            [t.tokens.float().view(t.masks.shape[0], -1, self.ibot.out_dim).mean(dim=1) for t in teachers]
        )
        self.patch_center.copy_(updated_center(self.patch_center, per_image, self.ibot.patch_center_momentum))
