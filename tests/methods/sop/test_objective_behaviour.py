"""SOPObjective pinned to its definitions: KoLeo, collapse diagnostics, generator use, shape checks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sopvit import SOPObjective
from sopvit.methods.sop import build_prototype_tasks
from sopvit.methods.sop.objective import koleo_loss
from tests.methods.sop.test_objective import SMALL, _batch


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_other_row() -> None:
    z = _unit(6, 4, seed=0)
    nearest = [min(float((z[i] - z[j]).norm()) for j in range(6) if j != i) for i in range(6)]
    expected = -sum(math.log(d + 1e-8) for d in nearest) / 6
    assert koleo_loss(z).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_of_duplicate_rows_is_large_but_finite() -> None:
    z = _unit(3, 4, seed=1)
    loss = koleo_loss(torch.cat([z, z[:1]]))
    assert torch.isfinite(loss) and loss.item() > 4.0  # two rows at distance 0 contribute -log(1e-8) / 4


def _entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


def test_assignment_metrics_follow_their_definitions() -> None:
    t, b, p = 2, 2, 3
    gen = torch.Generator().manual_seed(3)
    s_glob = torch.rand(t, 2 * b, p, generator=gen).softmax(-1)
    t_glob = (4 * torch.rand(t, 2 * b, p, generator=gen)).softmax(-1)
    metrics = SOPObjective._assignment_metrics(s_glob, t_glob, b)
    rows = t_glob.tolist()
    usage = sum(_entropy([sum(r[j] for r in task) / (2 * b) for j in range(p)]) for task in rows) / t
    sharpness = sum(_entropy(r) for task in rows for r in task) / (t * 2 * b)
    s_arg, t_arg = s_glob.argmax(-1).tolist(), t_glob.argmax(-1).tolist()
    # student view 1 is compared with teacher view 2 and the other way round
    agree = sum(s_arg[i][r] == t_arg[i][(r + b) % (2 * b)] for i in range(t) for r in range(2 * b)) / (
        2 * b * t
    )
    assert metrics["proto_entropy"].item() == pytest.approx(usage / math.log(p), rel=1e-5)
    assert metrics["teacher_entropy"].item() == pytest.approx(sharpness / math.log(p), rel=1e-5)
    assert metrics["agreement"].item() == pytest.approx(agree)


def test_assignment_metrics_of_one_hot_agreeing_views() -> None:
    # teacher one-hot on prototypes 0 and 1 for views 1 and 2; the student predicts the other view's prototype
    t_glob = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    s_glob = torch.tensor([[[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]]])
    metrics = SOPObjective._assignment_metrics(s_glob, t_glob, 1)
    assert metrics["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["proto_entropy"].item() == pytest.approx(math.log(2) / math.log(4), rel=1e-5)
    assert metrics["agreement"].item() == 1.0


def test_same_seed_gives_the_same_memories_drawn_from_the_objectives_generator() -> None:
    a, b = SOPObjective(SMALL), SOPObjective(SMALL)
    assert torch.equal(a.cls_bank.embeddings, b.cls_bank.embeddings)
    assert torch.equal(a.patch_bank.embeddings, b.patch_bank.embeddings)
    gen = torch.Generator().manual_seed(SMALL.seed)
    cls = F.normalize(torch.randn(SMALL.cls_bank_size, SMALL.dim, generator=gen), dim=1)
    patch = F.normalize(torch.randn(SMALL.patch_bank_size, SMALL.dim, generator=gen), dim=1)
    assert torch.equal(a.cls_bank.embeddings, cls) and torch.equal(a.patch_bank.embeddings, patch)


@pytest.mark.parametrize("selection", ["uniform", "low_cv"])
def test_a_loss_draws_the_cls_tasks_then_one_patch_task(selection: str) -> None:
    cfg = replace(SMALL, anchor_selection=selection, patch_keep_fraction=0.5, patch_k=2)
    objective = SOPObjective(cfg)
    gen = torch.Generator()
    gen.set_state(objective.generator.get_state())
    cls_bank, patch_bank = objective.cls_bank.embeddings.clone(), objective.patch_bank.embeddings.clone()
    objective(**_batch(), teacher_temp=0.04)
    build_prototype_tasks(
        cls_bank,
        cfg.cls_tasks,
        cfg.cls_anchors,
        cfg.cls_k,
        cfg.smoothing,
        cfg.cls_keep_fraction,
        gen,
        selection,
    )
    build_prototype_tasks(
        patch_bank, 1, cfg.patch_anchors, cfg.patch_k, cfg.smoothing, cfg.patch_keep_fraction, gen, selection
    )
    assert torch.equal(gen.get_state(), objective.generator.get_state())


def test_low_cv_settings_without_enough_neighbours_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="k >= 2"):
        SOPObjective(SMALL, anchor_selection="low_cv", cls_k=1)


def test_metrics_hold_the_total_loss_and_koleo_only_when_weighted() -> None:
    batch = _batch()
    loss, metrics = SOPObjective(SMALL)(**batch, teacher_temp=0.04)
    assert "loss_koleo" not in metrics
    assert torch.equal(metrics["loss"], loss.detach())
    _, weighted = SOPObjective(SMALL, koleo_weight=0.5)(**batch, teacher_temp=0.04)
    torch.testing.assert_close(weighted["loss_koleo"], koleo_loss(batch["student_cls"][:6]))


def test_one_image_per_batch_and_the_two_global_crops_alone_are_accepted() -> None:
    loss, _ = SOPObjective(SMALL)(**_batch(b=1, crops=2), teacher_temp=0.04)
    assert torch.isfinite(loss)


def test_bad_cls_counts_are_refused() -> None:
    objective = SOPObjective(SMALL)
    batch = _batch(b=3, crops=4)
    student = batch["student_cls"]
    # fewer than two crops, or not whole crops of B images
    for bad in (student[:3], student[:7], torch.cat([student, student[:1]])):
        with pytest.raises(ValueError, match="C >= 2"):
            objective(**(batch | {"student_cls": bad}), teacher_temp=0.04)
    with pytest.raises(ValueError, match="C >= 2"):
        objective.loss(
            batch["student_cls"][:0], batch["teacher_cls"][:0], *_tokens(0), n_images=0, teacher_temp=0.04
        )


def _tokens(m: int, dim: int = SMALL.dim) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _unit(m, dim, seed=5), _unit(m, dim, seed=6), torch.zeros(m, dtype=torch.long)


def test_token_shapes_must_agree() -> None:
    objective = SOPObjective(SMALL)
    batch = _batch(b=2, crops=2)
    student, teacher, image = _tokens(4)
    with pytest.raises(ValueError, match="must agree"):
        objective.loss(batch["student_cls"], batch["teacher_cls"], student, teacher[:3], image, 4, 0.04)
    with pytest.raises(ValueError, match="must agree"):
        objective.loss(batch["student_cls"], batch["teacher_cls"], student, teacher, image[:3], 4, 0.04)


def test_both_memories_remember_the_sample_ids() -> None:
    objective = SOPObjective(SMALL)
    objective(**_batch(), teacher_temp=0.04, sample_ids=torch.tensor([4, 5, 6]))
    assert objective.patch_bank.sample_ids[:3].tolist() == [4, 5, 6]
    assert objective.cls_bank.sample_ids[:3].tolist() == [4, 5, 6]
