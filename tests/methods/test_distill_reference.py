"""DINO / iBOT losses and centre update against independent loop implementations of the published formulas.

The references below follow the structure of ``DINOLoss`` (facebookresearch/dino, main_dino.py) and
``iBOTLoss`` (bytedance/ibot, main_ibot.py): per-view chunks, a python double loop over (teacher view q,
student view v) pairs, and iBOT's MIM term over all L patch tokens of each global image with the bool mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sopvit.methods.dino import cls_distillation_loss
from sopvit.methods.distill import updated_center
from sopvit.methods.ibot import masked_patch_distillation_loss
from tests.gloo import run_gloo_ranks

ST, TT = 0.1, 0.04


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ references (published formulas)


def _reference_cls(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int, st: float, tt: float
) -> torch.Tensor:
    student_views = (student / st).chunk(n_crops)
    teacher_views = F.softmax((teacher - center) / tt, dim=-1).detach().chunk(2)
    total, n_terms = torch.zeros(()), 0
    for q in range(len(teacher_views)):
        for v in range(len(student_views)):
            if v == q:
                continue
            ce = torch.sum(-teacher_views[q] * F.log_softmax(student_views[v], dim=-1), dim=-1)
            total = total + ce.mean()
            n_terms += 1
    return total / n_terms


def _reference_mim(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    masks: torch.Tensor,
    center: torch.Tensor,
    st: float,
    tt: float,
) -> torch.Tensor:
    """iBOT over all L tokens. student_patch, teacher_patch: (2B, L, K); masks: (2B, L) bool;
    center: (1, 1, K)."""
    student_views = (student_patch / st).chunk(2)
    teacher_views = F.softmax((teacher_patch - center) / tt, dim=-1).detach().chunk(2)
    mask_views = masks.chunk(2)
    total, n_terms = torch.zeros(()), 0
    for q in range(2):
        ce = torch.sum(-teacher_views[q] * F.log_softmax(student_views[q], dim=-1), dim=-1)  # (B, L)
        mask = mask_views[q]
        per_image = torch.sum(ce * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        total = total + per_image.mean()
        n_terms += 1
    return total / n_terms


def _reference_mim_python(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    masks: torch.Tensor,
    center: torch.Tensor,
    st: float,
    tt: float,
) -> float:
    """Same formula with scalar python loops over images and tokens (no broadcasting at all)."""
    n_images, n_tokens, _ = student_patch.shape
    batch = n_images // 2
    view_means = []
    for view in range(2):
        image_losses = []
        for b in range(batch):
            i = view * batch + b
            total, count = 0.0, 0
            for j in range(n_tokens):
                if not masks[i, j]:
                    continue
                t = torch.softmax((teacher_patch[i, j] - center.flatten()) / tt, dim=0)
                log_s = torch.log_softmax(student_patch[i, j] / st, dim=0)
                total += float(-(t * log_s).sum())
                count += 1
            image_losses.append(total / max(count, 1))
        view_means.append(sum(image_losses) / batch)
    return sum(view_means) / 2


def _random_masks(n_images: int, n_tokens: int, seed: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    g = _gen(seed)
    ratios = torch.rand(n_images, 1, generator=g)
    masks = torch.rand(n_images, n_tokens, generator=g) < ratios
    for i in empty:
        masks[i] = False
    return masks


def _masked_inputs(
    masks: torch.Tensor, k: int, seed: int, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    n_images, n_tokens = masks.shape
    student = (torch.randn(n_images, n_tokens, k, generator=g) * scale).requires_grad_()
    teacher = torch.randn(n_images, n_tokens, k, generator=g) * scale
    center = torch.randn(1, k, generator=g)
    return student, teacher, center


# ------------------------------------------------------------------ [CLS] term


@pytest.mark.parametrize("n_local", [0, 2, 4])
@pytest.mark.parametrize(("batch", "k"), [(1, 7), (3, 33), (4, 256)])
def test_cls_loss_matches_pairwise_loop(n_local: int, batch: int, k: int) -> None:
    n_crops = 2 + n_local
    g = _gen(100 * n_local + 10 * batch + k)
    student = (torch.randn(n_crops * batch, k, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2 * batch, k, generator=g) * 2
    center = torch.randn(1, k, generator=g) * 0.5

    ours = cls_distillation_loss(student, teacher, center, ST, TT)
    (grad_ours,) = torch.autograd.grad(ours, student)
    ref = _reference_cls(student, teacher, center, n_crops, ST, TT)
    (grad_ref,) = torch.autograd.grad(ref, student)

    assert ours.shape == () and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


def test_cls_loss_hand_computed_two_crops() -> None:
    # K = 2, B = 1, zero centre. Teacher probs p_q = softmax(t_q / tt); the 2 pairs are (0, 1) and (1, 0).
    student = torch.tensor([[0.0, 0.1], [0.2, 0.0]])
    teacher = torch.tensor([[0.04, 0.0], [0.0, 0.0]])
    p0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    p1 = torch.tensor([0.5, 0.5])
    log_s0 = torch.log_softmax(torch.tensor([0.0, 1.0]), 0)
    log_s1 = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    expected = (-(p0 * log_s1).sum() - (p1 * log_s0).sum()) / 2
    out = cls_distillation_loss(student, teacher, torch.zeros(1, 2), ST, TT)
    torch.testing.assert_close(out, expected)


def test_cls_loss_teacher_and_center_get_no_gradient() -> None:
    g = _gen(0)
    student = torch.randn(8, 5, generator=g, requires_grad=True)
    teacher = torch.randn(4, 5, generator=g, requires_grad=True)
    center = torch.randn(1, 5, generator=g, requires_grad=True)
    cls_distillation_loss(student, teacher, center, ST, TT).backward()
    assert student.grad is not None and teacher.grad is None and center.grad is None


def test_cls_loss_is_float32_under_bf16_autocast() -> None:
    g = _gen(1)
    student = torch.randn(8, 16, generator=g)
    teacher = torch.randn(4, 16, generator=g)
    center = torch.zeros(1, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = cls_distillation_loss(student.bfloat16(), teacher.bfloat16(), center, ST, TT)
    assert out.dtype == torch.float32
    ref = _reference_cls(student.bfloat16().float(), teacher.bfloat16().float(), center, 4, ST, TT)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "center_shape", "match"),
    [
        ((8,), (4, 5), (1, 5), "2-D"),
        ((8, 5), (4, 6), (1, 6), "K=5"),
        ((8, 5), (3, 5), (1, 5), "2 \\* B rows"),
        ((0, 5), (0, 5), (1, 5), "2 \\* B rows"),
        ((7, 5), (4, 5), (1, 5), "C \\* B rows"),
        ((2, 5), (4, 5), (1, 5), "C >= 2"),
        ((8, 5), (4, 5), (5,), "center"),
        ((8, 5), (4, 5), (1, 4), "center"),
    ],
)
def test_cls_loss_rejects_bad_shapes(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], center_shape: tuple[int, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cls_distillation_loss(
            torch.zeros(student_shape), torch.zeros(teacher_shape), torch.zeros(center_shape), ST, TT
        )


@pytest.mark.parametrize(("st", "tt"), [(0.0, 0.04), (0.1, 0.0), (-0.1, 0.04)])
def test_cls_loss_rejects_bad_temperatures(st: float, tt: float) -> None:
    with pytest.raises(ValueError, match="temp"):
        cls_distillation_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(1, 3), st, tt)


# ------------------------------------------------------------------ masked patch (MIM) term


@pytest.mark.parametrize(
    ("batch", "n_tokens", "k", "empty"),
    [
        (1, 4, 5, ()),
        (2, 9, 16, (1,)),  # an image of view 1 without a masked token
        (3, 16, 64, (0, 4)),  # one empty image in each view
        (4, 6, 3, (0, 1, 2, 3)),  # view 1 has no masked token at all
    ],
)
def test_mim_loss_matches_ibot_formula_over_all_tokens(
    batch: int, n_tokens: int, k: int, empty: tuple[int, ...]
) -> None:
    n_images = 2 * batch
    seed = 1000 * batch + 10 * n_tokens + k
    masks = _random_masks(n_images, n_tokens, seed, empty)
    student, teacher, center = _masked_inputs(masks, k, seed + 1)

    token_image = masks.nonzero()[:, 0]
    ours = masked_patch_distillation_loss(
        student[masks], teacher[masks], token_image, n_images, center, ST, TT
    )
    (grad_ours,) = torch.autograd.grad(ours, student)
    ref = _reference_mim(student, teacher, masks, center[None], ST, TT)
    (grad_ref,) = torch.autograd.grad(ref, student)

    assert ours.shape == () and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-8)
    assert grad_ours[~masks].abs().max() == 0  # unmasked tokens carry no loss
    py = _reference_mim_python(student.detach(), teacher, masks, center, ST, TT)
    assert ours.item() == pytest.approx(py, rel=1e-5, abs=1e-6)


def test_mim_loss_is_independent_of_token_order() -> None:
    masks = _random_masks(6, 10, seed=5, empty=(2,))
    student, teacher, center = _masked_inputs(masks, 12, seed=6)
    s, t, img = student.detach()[masks], teacher[masks], masks.nonzero()[:, 0]
    perm = torch.randperm(len(img), generator=_gen(7))
    a = masked_patch_distillation_loss(s, t, img, 6, center, ST, TT)
    b = masked_patch_distillation_loss(s[perm], t[perm], img[perm], 6, center, ST, TT)
    torch.testing.assert_close(a, b)


def test_mim_loss_hand_computed() -> None:
    # B = 1: image 0 (view 1) has 2 masked tokens, image 1 (view 2) has 1. K = 2, zero centre.
    student = torch.tensor([[0.1, 0.0], [0.0, 0.0], [0.0, 0.3]])
    teacher = torch.tensor([[0.04, 0.0], [0.0, 0.0], [0.0, 0.0]])
    image = torch.tensor([0, 0, 1])
    ce = [
        float(
            -(torch.softmax(torch.tensor([1.0, 0.0]), 0) * torch.log_softmax(torch.tensor([1.0, 0]), 0)).sum()
        ),
        float(-(torch.tensor([0.5, 0.5]) * torch.log_softmax(torch.tensor([0.0, 0.0]), 0)).sum()),
        float(-(torch.tensor([0.5, 0.5]) * torch.log_softmax(torch.tensor([0.0, 3.0]), 0)).sum()),
    ]
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 2
    out = masked_patch_distillation_loss(student, teacher, image, 2, torch.zeros(1, 2), ST, TT)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_mim_loss_without_masked_tokens_is_zero_and_differentiable() -> None:
    student = torch.zeros(0, 8, requires_grad=True)
    out = masked_patch_distillation_loss(
        student, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 4, torch.zeros(1, 8), ST, TT
    )
    assert out.item() == 0.0
    out.backward()
    assert student.grad is not None and student.grad.shape == (0, 8)
    masks = torch.zeros(4, 5, dtype=torch.bool)
    full_student, teacher, center = _masked_inputs(masks, 8, seed=3)
    assert _reference_mim(full_student, teacher, masks, center[None], ST, TT).item() == 0.0


def test_mim_loss_teacher_gets_no_gradient_and_bf16_gives_float32() -> None:
    masks = _random_masks(4, 6, seed=11)
    student, teacher, center = _masked_inputs(masks, 9, seed=12)
    teacher.requires_grad_()
    img = masks.nonzero()[:, 0]
    masked_patch_distillation_loss(student[masks], teacher[masks], img, 4, center, ST, TT).backward()
    assert student.grad is not None and teacher.grad is None
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = masked_patch_distillation_loss(
            student.detach()[masks].bfloat16(), teacher.detach()[masks].bfloat16(), img, 4, center, ST, TT
        )
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"student_tokens": torch.zeros(3, 4, 1)}, "\\(M, K\\)"),
        ({"teacher_tokens": torch.zeros(3, 5)}, "\\(M, K\\)"),
        ({"token_image": torch.zeros(2, dtype=torch.long)}, "token_image"),
        ({"token_image": torch.zeros(3, dtype=torch.int32)}, "token_image"),
        ({"n_images": 3}, "n_images"),
        ({"n_images": 0}, "n_images"),
        ({"n_images": True}, "n_images"),
        ({"center": torch.zeros(1, 5)}, "center"),
        ({"center": torch.zeros(1, 1, 4)}, "center"),
        ({"teacher_temp": 0.0}, "teacher_temp"),
        ({"student_temp": -1.0}, "student_temp"),
    ],
)
def test_mim_loss_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "student_tokens": torch.zeros(3, 4),
        "teacher_tokens": torch.zeros(3, 4),
        "token_image": torch.zeros(3, dtype=torch.long),
        "n_images": 2,
        "center": torch.zeros(1, 4),
        "student_temp": ST,
        "teacher_temp": TT,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        masked_patch_distillation_loss(**args)


# ------------------------------------------------------------------ centre update


def test_center_hand_computed() -> None:
    center = torch.tensor([[1.0, 0.0, -2.0]])
    outputs = torch.tensor([[2.0, 4.0, 0.0], [4.0, 0.0, 1.0]])  # batch mean (3, 2, 0.5)
    new = updated_center(center, outputs, 0.9)
    torch.testing.assert_close(new, torch.tensor([[0.9 + 0.3, 0.2, -1.8 + 0.05]]))
    assert torch.equal(center, torch.tensor([[1.0, 0.0, -2.0]]))  # input untouched


def test_center_momentum_edges() -> None:
    g = _gen(2)
    center = torch.randn(1, 6, generator=g)
    outputs = torch.randn(10, 6, generator=g)
    assert torch.equal(updated_center(center, outputs, 1.0), center)
    torch.testing.assert_close(updated_center(center, outputs, 0.0), outputs.mean(0, keepdim=True))


def test_center_matches_reference_sum_over_rows_for_cls_and_patch() -> None:
    g = _gen(4)
    center, center2 = torch.randn(1, 7, generator=g), torch.randn(1, 1, 7, generator=g)
    teacher_cls = torch.randn(6, 7, generator=g)
    teacher_patch = torch.randn(6, 5, 7, generator=g)  # (2B, L, K)
    m = 0.9
    ref_cls = center * m + torch.sum(teacher_cls, 0, keepdim=True) / len(teacher_cls) * (1 - m)
    ref_patch = center2 * m + torch.sum(teacher_patch.mean(1), 0, keepdim=True) / len(teacher_patch) * (1 - m)
    torch.testing.assert_close(updated_center(center, teacher_cls, m), ref_cls)
    torch.testing.assert_close(updated_center(center2[0], teacher_patch.mean(dim=1), m), ref_patch[0])


def test_center_keeps_dtype_and_has_no_grad() -> None:
    center = torch.zeros(1, 4, dtype=torch.float64)
    outputs = torch.ones(3, 4, dtype=torch.bfloat16, requires_grad=True)
    new = updated_center(center, outputs, 0.5)
    assert new.dtype == torch.float64 and not new.requires_grad
    torch.testing.assert_close(new, torch.full((1, 4), 0.5, dtype=torch.float64))


@pytest.mark.parametrize(
    ("center_shape", "outputs_shape", "momentum", "match"),
    [
        ((1, 4), (3, 5), 0.9, "center"),
        ((4,), (3, 4), 0.9, "center"),
        ((1, 4), (0, 4), 0.9, "N >= 1"),
        ((1, 4), (2, 3, 4), 0.9, "\\(N, K\\)"),
        ((1, 4), (3, 4), 1.5, "momentum"),
        ((1, 4), (3, 4), -0.1, "momentum"),
    ],
)
def test_center_rejects_bad_arguments(
    center_shape: tuple[int, ...], outputs_shape: tuple[int, ...], momentum: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        updated_center(torch.zeros(center_shape), torch.zeros(outputs_shape), momentum)


def _center_rank(rank: int, out: Path) -> None:
    g = _gen(9)
    center = torch.randn(1, 5, generator=g)
    outputs = torch.randn(2, 4, 5, generator=g)  # 2 ranks x N = 4 rows
    torch.save(updated_center(center, outputs[rank], 0.7), out / f"rank{rank}.pt")


@pytest.mark.slow
def test_center_is_global_over_gloo_ranks(tmp_path: Path) -> None:
    run_gloo_ranks(_center_rank, 2, tmp_path)
    g = _gen(9)
    center = torch.randn(1, 5, generator=g)
    outputs = torch.randn(2, 4, 5, generator=g)
    expected = updated_center(center, outputs.flatten(0, 1), 0.7)  # one process, all 8 rows
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)
