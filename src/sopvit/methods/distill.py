"""The math every distillation objective shares (DINO, iBOT and SOP): cross-entropy of a student view
against the other views' teacher targets, teacher centring, the per-image mean over masked tokens, and the
entropy diagnostics of the targets. Pure functions of tensors; no gradient flows into a teacher side.

Teacher and student are compared by cross-entropy over the K output dimensions (prototypes):
``H(t, s) = -sum_k t_k log s_k``, always in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sopvit.distributed import all_reduce_mean


def check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_center(center: Tensor, k: int) -> None:
    if center.shape != (1, k):
        raise ValueError(f"center must have shape (1, {k}), got {tuple(center.shape)}")


def centered_probs(teacher: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """softmax((t - c) / tau_t) in float32, detached: (..., K) logits and a (1, K) centre -> (..., K)."""
    return ((teacher.detach().float() - center.detach().float()) / teacher_temp).softmax(dim=-1)


def cross_view_ce(student_logs: Sequence[Tensor], teacher_probs: Sequence[Tensor]) -> Tensor:
    """Mean of ``H(teacher_j, student_i)`` over every pair of different views (i != j).

    student_logs: per student view ``[global1, global2, local1, ...]`` its log-probabilities, each
    (..., B, K); teacher_probs: per teacher view ``[global1, global2]`` its targets, same shape. The cross
    entropy is averaged over the leading entries (tasks, batch), then over the
    ``S * T - min(S, T)`` pairs. ``sum_{i != j} H(t_j, s_i) = -t_j . (sum_i log s_i - log s_j)``: one sum
    of the student views serves every teacher view, and nothing of size S x B x K is materialised (nor a
    matmul that TF32 could round). Returns a float32 scalar.
    """
    n_pairs = len(student_logs) * len(teacher_probs) - min(len(student_logs), len(teacher_probs))
    if n_pairs == 0:
        raise ValueError("cross-view loss: one student and one teacher crop of the same view make no pair")
    total_log = torch.stack(list(student_logs)).sum(dim=0)
    total = student_logs[0].new_zeros((), dtype=torch.float32)
    for j, q in enumerate(teacher_probs):
        other = total_log - student_logs[j] if j < len(student_logs) else total_log
        total = total - (q.detach().float() * other).sum(dim=-1).mean()
    return total / n_pairs


def per_image_mean(ce: Tensor, image_of_token: Tensor, n_images: int) -> Tensor:
    """Masked-token loss of a batch: each image's mean over its masked tokens, then the mean over images.

    ce: (M,) cross-entropy of each masked token; image_of_token: (M,) int64 image id in
    ``[0, n_images)``. Images without a masked token contribute 0 (and still count in the mean).
    """
    counts = torch.bincount(image_of_token, minlength=n_images).clamp_min(1).to(ce.dtype)
    # each token weighs 1 / (its image's masked count); images are then averaged
    return (ce / counts[image_of_token]).sum() / max(n_images, 1)


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) of distributions over the last dim: (..., K) -> (...)."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


@torch.no_grad()
def collapse_metrics(targets: Tensor) -> dict[str, Tensor]:
    """Collapse diagnostics of teacher targets (..., N, K), both normalised by log K and averaged over the
    leading dims: ``proto_entropy`` 1 when all K prototypes are used evenly over the N targets,
    ``teacher_entropy`` 0 when the targets are one-hot."""
    log_k = math.log(targets.shape[-1])
    targets = targets.float()
    return {
        "proto_entropy": entropy(targets.mean(dim=-2)).mean() / log_k,
        "teacher_entropy": entropy(targets).mean() / log_k,
    }


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
    check_center(center, teacher_outputs.shape[1])
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    local_sum = teacher_outputs.float().sum(dim=0, keepdim=True)
    # all_reduce_mean = (sum over ranks) / world_size, so this is (global sum) / (N * world_size)
    batch_center = all_reduce_mean(local_sum) / teacher_outputs.shape[0]
    return (center.float() * momentum + batch_center * (1.0 - momentum)).to(center.dtype)
