"""DINO and iBOT objectives as pure tensor functions: the [CLS] self-distillation term, iBOT's masked
patch term and the EMA update of the teacher centre.

The formulas are those of the reference implementations (``DINOLoss`` in facebookresearch/dino
``main_dino.py``, ``iBOTLoss`` in bytedance/ibot ``main_ibot.py``). Teacher and student are compared by
cross-entropy between the centred, sharpened teacher distribution and the student distribution over the
K output dimensions (prototypes) of the projection head:

    H(t, s) = -sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k

Everything is computed in float32 (autocast disabled), whatever the dtype of the logits. The teacher
side is a target: no gradient flows into ``teacher_*`` or ``center``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sopvit.distributed import all_reduce_mean


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_center(center: Tensor, k: int) -> None:
    if center.shape != (1, k):
        raise ValueError(f"center must have shape (1, {k}), got {tuple(center.shape)}")


def _teacher_probs(teacher: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """softmax((t - c) / tau_t) in float32, detached: (..., K)."""
    return ((teacher.detach().float() - center.detach().float()) / teacher_temp).softmax(dim=-1)


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
    _check_center(center, k)
    _check_temperature("student_temp", student_temp)
    _check_temperature("teacher_temp", teacher_temp)
    n_crops = n_student // batch

    with torch.autocast(device_type=student_cls.device.type, enabled=False):
        teacher = _teacher_probs(teacher_cls, center, teacher_temp).view(2, batch, k)
        log_student = (student_cls.float() / student_temp).log_softmax(dim=-1).view(n_crops, batch, k)
        # sum_{v != q} H(t_q, s_v) = -t_q . (sum_v log s_v - log s_q): one (B, K) sum serves both q, and
        # nothing of size C x B x K is materialised (nor a matmul that TF32 could round)
        all_views = log_student.sum(dim=0)
        total = student_cls.new_zeros((), dtype=torch.float32)
        for q in range(2):
            total = total - (teacher[q] * (all_views - log_student[q])).sum(dim=-1).mean()
        return total / (2 * (n_crops - 1))


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
    _check_center(center, k)
    _check_temperature("student_temp", student_temp)
    _check_temperature("teacher_temp", teacher_temp)

    with torch.autocast(device_type=student_tokens.device.type, enabled=False):
        teacher = _teacher_probs(teacher_tokens, center, teacher_temp)
        log_student = (student_tokens.float() / student_temp).log_softmax(dim=-1)
        ce = -(teacher * log_student).sum(dim=-1)  # (M,)
        counts = torch.bincount(token_image, minlength=n_images).clamp_min(1).to(ce.dtype)
        # each token weighs 1 / (its image's masked count); images are then averaged
        return (ce / counts[token_image]).sum() / n_images


@torch.no_grad()
def updated_center(center: Tensor, teacher_outputs: Tensor, momentum: float) -> Tensor:
    """EMA of the teacher centre: ``center * m + batch_center * (1 - m)``.

    ``batch_center`` is the mean of ``teacher_outputs`` over its rows and over every rank: the row sums
    are all-reduced (summed) across ranks when a process group is initialised, then divided by
    ``N * world_size`` (every rank must pass the same N, as in the reference).

    For DINO / iBOT's [CLS] centre pass the teacher's (2B, K) [CLS] logits. For iBOT's patch centre pass,
    per teacher image, the mean over its L patch tokens (all of them, masked or not), i.e.
    ``teacher_patch_logits.mean(dim=1)`` of shape (2B, K): the reference's ``center2`` update.

    Args:
        center: (1, K) current centre.
        teacher_outputs: (N, K) teacher logits of this rank's batch (N >= 1).
        momentum: m in [0, 1] (0.9 in DINO and iBOT); m = 1 keeps ``center``, m = 0 replaces it.

    Returns:
        a new (1, K) tensor of ``center``'s dtype and device (``center`` is not modified).
    """
    if teacher_outputs.ndim != 2 or teacher_outputs.shape[0] == 0:
        raise ValueError(f"teacher_outputs must be (N, K) with N >= 1, got {tuple(teacher_outputs.shape)}")
    _check_center(center, teacher_outputs.shape[1])
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    local_sum = teacher_outputs.float().sum(dim=0, keepdim=True)
    # all_reduce_mean = (sum over ranks) / world_size, so this is (global sum) / (N * world_size)
    batch_center = all_reduce_mean(local_sum) / teacher_outputs.shape[0]
    return (center.float() * momentum + batch_center * (1.0 - momentum)).to(center.dtype)
