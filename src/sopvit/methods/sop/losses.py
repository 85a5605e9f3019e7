"""Assignments of embeddings to prototypes and the two SOP cross-entropies.

All log-probabilities are float32 with a floor, never bf16 and never -inf (the reference computed
``log(p ** -q)`` in bf16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sopvit.methods.distill import cross_view_ce, per_image_mean
from sopvit.methods.sop.prototypes import Prototypes

_FLOOR = torch.finfo(torch.float32).tiny


def assign_to_supports(
    z: torch.Tensor, supports: torch.Tensor, weights: torch.Tensor, n_prototypes: int, temperature: float
) -> torch.Tensor:
    """P(z) = softmax(z D^T / tau) Y, batched over tasks, without materialising Y.

    z: (N, d) unit-norm embeddings; supports: (T, S, d) grouped by prototype (S = P * g, g supports each);
    weights: (T, S) each support's weight w_r for its own prototype -> (T, N, P) float32.
    Y[r, j] = w_r if j is r's prototype else (1 - w_r) / (P - 1), so the vote is one dot product for the
    shared part plus a sum within each prototype's group: O(N S) instead of the O(N S P) of a dense Y.
    The similarity matmul runs in the input dtype (bf16 under autocast); softmax and vote in float32.
    """
    t, s, _ = supports.shape
    # 1/tau is folded into z: one small (N, d) scaling instead of one over every (T, N, S) logit.
    logits = torch.einsum("nd,tsd->tns", z / temperature, supports.to(z.dtype))
    with torch.autocast(device_type=z.device.type, enabled=False):
        soft = logits.softmax(dim=-1, dtype=torch.float32)  # (T, N, S)
        w = weights.float()
        spread = (1.0 - w) / (n_prototypes - 1)  # what each support gives every other prototype
        shared = torch.einsum("tns,ts->tn", soft, spread)[..., None]
        own = (soft * (w - spread)[:, None, :]).view(t, -1, n_prototypes, s // n_prototypes).sum(-1)
        return shared + own


def assign(z: torch.Tensor, prototypes: Prototypes, temperature: float) -> torch.Tensor:
    """Probabilities of ``z`` (..., d) over one task's prototypes -> (..., P) float32, rows sum to 1."""
    if prototypes.supports.ndim != 2:
        raise ValueError("assign expects one task's prototypes (supports of shape (S, d))")
    if z.shape[-1] != prototypes.supports.shape[-1]:
        raise ValueError(f"z has dim {z.shape[-1]} but the supports have dim {prototypes.supports.shape[-1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat = z.reshape(-1, z.shape[-1])
    p = assign_to_supports(
        flat, prototypes.supports[None], prototypes.weights[None], prototypes.num_prototypes, temperature
    )
    return p[0].reshape(*z.shape[:-1], -1)


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """float32 log with a floor at the smallest normal float32, so it is finite everywhere."""
    return p.float().clamp_min(_FLOOR).log()


def cross_entropy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """H(q, p) = -sum_j q_j log p_j over the last dim; teacher is a target (no gradient)."""
    return -(teacher.detach().float() * safe_log(student)).sum(dim=-1)


def cross_view_loss(
    student_probs: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """[CLS] loss over every (student crop i, teacher crop j) pair with i != j.

    student_probs: per student crop [global1, global2, local1, ...], each (..., B, P);
    teacher_probs: per teacher global crop [global1, global2], each (..., B, P).
    Returns the mean over pairs and over all leading entries (tasks, batch) of H(teacher_j, student_i).
    """
    if len(student_probs) == 0 or len(teacher_probs) == 0:
        raise ValueError("cross_view_loss needs at least one student and one teacher crop")
    shape = teacher_probs[0].shape
    for name, probs in (("student", student_probs), ("teacher", teacher_probs)):
        for i, p in enumerate(probs):
            if p.shape != shape:
                raise ValueError(f"{name} crop {i} has shape {tuple(p.shape)}, expected {tuple(shape)}")
    return cross_view_ce([safe_log(p) for p in student_probs], teacher_probs)


def masked_token_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, image_of_token: torch.Tensor, n_images: int
) -> torch.Tensor:
    """SOP-MIM loss from the masked tokens only.

    student_probs, teacher_probs: (M, P) for the M masked tokens of a batch; image_of_token: (M,) image id
    in [0, n_images). Per image: CE summed over its masked tokens / its masked count; then the mean over
    all ``n_images`` images (those without a masked token contribute 0).
    """
    return per_image_mean(cross_entropy(teacher_probs, student_probs), image_of_token, n_images)


def masked_patch_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """SOP-MIM loss. student_probs, teacher_probs: (B, L, P); mask: bool (B, L), True = masked.

    CE summed over masked tokens / masked count per image (0 for an image with no masked token),
    averaged over the B images.
    """
    if student_probs.shape != teacher_probs.shape or student_probs.ndim != 3:
        raise ValueError(
            f"student and teacher probabilities must both be (B, L, P), got {tuple(student_probs.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    if mask.shape != student_probs.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool of shape {tuple(student_probs.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    image_of_token = mask.nonzero()[:, 0]
    return masked_token_loss(student_probs[mask], teacher_probs[mask], image_of_token, mask.shape[0])
