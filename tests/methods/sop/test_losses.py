import pytest
import torch
import torch.nn.functional as F

from sopvit import assign, build_prototypes, cross_view_loss, masked_patch_loss
from tests.methods.sop.reference import reference_assign, reference_cross_view, reference_masked


def _probs(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(-1)


def test_assign_equals_softmax_then_vote() -> None:
    gen = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(50, 6, generator=gen, dtype=torch.float64), dim=1)
    protos = build_prototypes(memory, 8, 3, 0.1, 0.5, torch.Generator().manual_seed(1))
    z = F.normalize(torch.randn(7, 6, generator=gen, dtype=torch.float64), dim=1)
    p = assign(z, protos, 0.1)
    assert p.dtype == torch.float32 and p.shape == (7, 4)
    expected = reference_assign(z, protos.supports, protos.contributions.double(), 0.1)
    torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.sum(-1), torch.ones(7), atol=1e-6, rtol=0)


def test_assign_keeps_leading_dims_and_is_finite_at_tiny_temperature() -> None:
    memory = F.normalize(torch.randn(30, 4), dim=1)
    protos = build_prototypes(memory, 6, 0, 0.0, 1.0, torch.Generator().manual_seed(0))
    z = F.normalize(torch.randn(2, 3, 4), dim=-1)
    p = assign(z, protos, 1e-4)
    assert p.shape == (2, 3, 6)
    assert torch.isfinite(p).all()
    # With smoothing 0 and anchor-only prototypes the vote is one-hot: log must still be finite.
    loss = cross_view_loss([p[0], p[1]], [p[1], p[0]])
    assert torch.isfinite(loss)


def test_assign_rejects_bad_input() -> None:
    protos = build_prototypes(F.normalize(torch.randn(20, 4), dim=1), 4, 1, 0.1, 1.0, torch.Generator())
    with pytest.raises(ValueError, match="dim"):
        assign(torch.randn(3, 5), protos, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        assign(torch.randn(3, 4), protos, 0.0)


@pytest.mark.parametrize(("n_student", "n_teacher"), [(2, 2), (4, 2), (6, 2), (1, 2)])
def test_cross_view_loss_matches_definition(n_student: int, n_teacher: int) -> None:
    student = [_probs(5, 7, seed=i) for i in range(n_student)]
    teacher = [_probs(5, 7, seed=100 + j) for j in range(n_teacher)]
    loss = cross_view_loss(student, teacher)
    assert loss.item() == pytest.approx(reference_cross_view(student, teacher), rel=1e-6)


def test_cross_view_loss_averages_leading_task_dim() -> None:
    student = [_probs(3, 5, 7, seed=i) for i in range(4)]
    teacher = [_probs(3, 5, 7, seed=10 + j) for j in range(2)]
    per_task = [cross_view_loss([s[t] for s in student], [q[t] for q in teacher]) for t in range(3)]
    torch.testing.assert_close(cross_view_loss(student, teacher), torch.stack(per_task).mean())


def test_cross_view_loss_errors() -> None:
    with pytest.raises(ValueError, match="crop 1"):
        cross_view_loss([_probs(2, 3, seed=0), _probs(2, 4, seed=1)], [_probs(2, 3, seed=2)])
    with pytest.raises(ValueError, match="no pair"):
        cross_view_loss([_probs(2, 3, seed=0)], [_probs(2, 3, seed=1)])
    with pytest.raises(ValueError, match="at least one"):
        cross_view_loss([], [_probs(2, 3, seed=1)])


def test_masked_patch_loss_matches_definition() -> None:
    student, teacher = _probs(4, 9, 6, seed=0), _probs(4, 9, 6, seed=1)
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[2] = False  # an image with no masked token contributes 0 but still counts in the mean
    loss = masked_patch_loss(student, teacher, mask)
    assert loss.item() == pytest.approx(reference_masked(student, teacher, mask), rel=1e-6)


def test_masked_patch_loss_with_nothing_masked_is_zero() -> None:
    s = _probs(2, 3, 4, seed=0)
    assert masked_patch_loss(s, s, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_masked_patch_loss_errors() -> None:
    s = _probs(2, 3, 4, seed=0)
    with pytest.raises(ValueError, match="mask"):
        masked_patch_loss(s, s, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, L, P\)"):
        masked_patch_loss(s, s[:, :2], torch.ones(2, 3, dtype=torch.bool))


def test_gradients_reach_only_the_student() -> None:
    memory = F.normalize(torch.randn(40, 8), dim=1)
    protos = build_prototypes(memory, 8, 2, 0.1, 0.5, torch.Generator())
    zs = F.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_()
    zt = F.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_()
    ps, pt = assign(zs, protos, 0.1), assign(zt, protos, 0.04)
    loss = cross_view_loss(list(ps), list(pt[:2])) + masked_patch_loss(
        ps, pt, torch.ones(3, 4, dtype=torch.bool)
    )
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None
    assert not protos.supports.requires_grad and not protos.contributions.requires_grad
