"""iBOT and DINO through the training loop: what the step feeds them checked against their published
formulas on full forwards, their centers, the frozen prototype layer, and exact resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.config import ConfigError
from sopvit.optim.groups import set_schedule
from sopvit.train.step import train_step
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config

K = 48
ALL_RANDOM = ("model.drop_path_rate=0.3", "data.mask_prob=0.5", "data.mask_ratio=[0.1,0.5]")


def _trainer(run_dir: Path, method: str, *overrides: str) -> Trainer:
    return Trainer(tiny_config(run_dir, f"method={method}", f"{method}.out_dim={K}", *overrides))


def _spy_loss(trainer: Trainer) -> list[torch.Tensor]:
    losses: list[torch.Tensor] = []
    compute = trainer.objective.compute_loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        loss, metrics = compute(*args, **kwargs)
        losses.append(loss.detach())
        return loss, metrics

    trainer.objective.compute_loss = spy  # type: ignore[method-assign]
    return losses


def _ce(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(-1)


def _published_loss(
    student: list[dict[str, torch.Tensor]],
    teacher: dict[str, torch.Tensor],
    masks: torch.Tensor,
    temps: tuple[float, float, float],
    patch: bool,
) -> torch.Tensor:
    """iBOT's loss (DINO's without the patch term) on full outputs: every patch token of each global view,
    the bool masks selecting the masked ones, loops over view pairs (centers are 0 at the first step)."""
    student_temp, teacher_temp, patch_temp = temps
    b = masks.shape[0] // 2
    t_cls = torch.softmax(teacher["cls"] / teacher_temp, -1).chunk(2)
    t_patch = torch.softmax(teacher["patch"] / patch_temp, -1).chunk(2)
    cls_terms, patch_terms = [], []
    for q in range(2):
        for v, crop in enumerate(student):
            if v != q:
                cls_terms.append(_ce(t_cls[q], crop["cls"], student_temp).mean())
            elif patch:
                m = masks[q * b : (q + 1) * b].float()
                token_loss = _ce(t_patch[q], crop["patch"], student_temp)
                patch_terms.append(((token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean())
    loss = torch.stack(cls_terms).mean()
    return loss + torch.stack(patch_terms).mean() if patch else loss


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_the_step_computes_the_published_loss_and_centers(tmp_path: Path, method: str) -> None:
    trainer = _trainer(tmp_path, method, "data.mask_prob=0.5", "data.mask_ratio=[0.1,0.5]")
    (batch,) = list(trainer.inputs.batches(0, 1, trainer.device))
    b = batch.crops[0].shape[0]
    masks = batch.masks.flatten(1) if method == "ibot" else torch.zeros_like(batch.masks.flatten(1))
    assert method == "dino" or 0 < int(masks.any(1).sum()) < 2 * b  # some images masked, some not
    student_before, teacher_before = copy.deepcopy(trainer.model.student), trainer.model.teacher
    with torch.no_grad():
        teacher = teacher_before(torch.cat(batch.crops[:2]))
        crop_masks = [masks[:b], masks[b:]] + [None] * (len(batch.crops) - 2)
        student = student_before(batch.crops, crop_masks)
    values = trainer.schedules.at(0)
    temps = (0.1, values.teacher_temp, values.patch_teacher_temp)
    expected = _published_loss(student, teacher, masks, temps, patch=method == "ibot")
    losses = _spy_loss(trainer)

    train_step(trainer.ctx, [batch], values, 0)

    torch.testing.assert_close(losses[0], expected, atol=1e-5, rtol=1e-5)
    objective = trainer.objective
    torch.testing.assert_close(objective.center, 0.1 * teacher["cls"].mean(0, keepdim=True))
    if method == "ibot":
        per_image = teacher["patch"].mean(1)  # every token, masked or not
        torch.testing.assert_close(objective.patch_center, 0.1 * per_image.mean(0, keepdim=True))


def test_dino_feeds_the_head_no_patch_token(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "dino")
    seen: list[tuple[int, int]] = []
    compute = trainer.objective.compute_loss

    def spy(student: Any, teacher: Any, values: Any) -> Any:
        seen.append((student.tokens.shape[0], teacher.tokens.shape[0]))
        return compute(student, teacher, values)

    trainer.objective.compute_loss = spy  # type: ignore[method-assign]
    train_step(trainer.ctx, list(trainer.inputs.batches(0, 1, trainer.device)), trainer.schedules.at(0), 0)
    assert seen == [(0, 0)]


def test_the_prototype_layer_is_frozen_for_freeze_last_layer_epochs(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "ibot", "ibot.freeze_last_layer=0.5")  # 8 steps an epoch: 4 frozen
    assert trainer.ctx.frozen == {"head.last_layer.": 4}
    layer = trainer.model.student.head.last_layer.parametrizations.weight  # type: ignore[union-attr]
    batches = list(trainer.inputs.batches(0, 2, trainer.device))
    before = layer.original1.detach().clone()
    other = trainer.model.student.head.mlp[0].weight.detach().clone()  # type: ignore[index]
    for step, batch in ((3, batches[0]), (4, batches[1])):
        values = trainer.schedules.at(step)
        set_schedule(trainer.optimizer, values.lr, values.weight_decay)
        train_step(trainer.ctx, [batch], values, step)
        if step == 3:
            assert torch.equal(layer.original1, before)
            assert not torch.equal(trainer.model.student.head.mlp[0].weight, other)  # type: ignore[index]
    assert not torch.equal(layer.original1, before)
    assert torch.equal(layer.original0, torch.ones_like(layer.original0))  # norm_last_layer: magnitude 1


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_an_interrupted_run_resumes_exactly(tmp_path: Path, method: str) -> None:
    flags = (*ALL_RANDOM, f"{method}.freeze_last_layer=0.5")  # the freeze ends after the resume point
    _trainer(tmp_path / "straight", method, *flags, "train.max_steps=6").fit()
    _trainer(tmp_path / "resumed", method, *flags, "train.max_steps=3").fit()
    resumed = _trainer(tmp_path / "resumed", method, *flags, "train.max_steps=6")
    assert resumed.step == 3
    resumed.fit()
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("straight", "resumed"))
    for part in ("student", "teacher", "objective"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)
    assert set(a["objective"]) == ({"center", "patch_center"} if method == "ibot" else {"center"})


def test_a_run_cannot_resume_under_another_method(tmp_path: Path) -> None:
    _trainer(tmp_path, "dino", "train.max_steps=1").fit()
    with pytest.raises(ConfigError, match="trained with method=dino, this config has ibot"):
        _trainer(tmp_path, "ibot")
