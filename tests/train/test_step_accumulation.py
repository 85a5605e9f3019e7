"""The step's bookkeeping pinned: accumulation averages gradients and metrics, DDP synchronises once per
step, gradients are released after the update, and the non-finite check names the right term."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sopvit.data.pipeline import Batch
from sopvit.optim.groups import set_schedule
from sopvit.train.step import NonFiniteLossError, _check_finite, train_step
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config

NO_CLIP = "train.clip_grad=0"


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(tiny_config(run_dir, *overrides))


def _batches(trainer: Trainer, n: int) -> list[Batch]:
    return list(trainer.inputs.batches(0, n, trainer.device))


def _generator_states(trainer: Trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the objective's two generators at the start of each micro-batch (memory_tokens is its
    first draw), so that a micro-batch can be replayed alone with the same randomness."""
    states: list[tuple[torch.Tensor, torch.Tensor]] = []
    objective = trainer.objective
    original = objective.memory_tokens

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        states.append((objective.generator.get_state(), objective.token_generator.get_state()))
        return original(*args, **kwargs)

    objective.memory_tokens = spy  # type: ignore[method-assign]
    return states


def _step_alone(
    run_dir: Path, batch: Batch, states: tuple[torch.Tensor, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Gradients (unclipped) and metrics of one step on ``batch`` alone from the initial weights."""
    trainer = _trainer(run_dir, NO_CLIP)
    trainer.objective.generator.set_state(states[0])
    trainer.objective.token_generator.set_state(states[1])
    grads = _grads_at_update(trainer)
    metrics = train_step(trainer.ctx, [batch], trainer.schedules.at(0), 0)
    return grads, metrics


def _grads_at_update(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    original, named = trainer.optimizer.step, list(trainer.model.student.named_parameters())

    def step(*args: Any, **kwargs: Any) -> Any:
        grads.update({n: p.grad.clone() for n, p in named if p.grad is not None})
        return original(*args, **kwargs)

    trainer.optimizer.step = step  # type: ignore[method-assign]
    return grads


def test_accumulation_applies_the_mean_gradient_and_reports_the_mean_metrics(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "both", NO_CLIP, "train.accum_steps=2")
    first, second = _batches(trainer, 2)
    states = _generator_states(trainer)
    grads = _grads_at_update(trainer)
    returned: list[dict[str, torch.Tensor]] = []
    compute = trainer.objective.compute_loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        loss, values = compute(*args, **kwargs)
        returned.append(values)
        return loss, values

    trainer.objective.compute_loss = spy  # type: ignore[method-assign]
    metrics = train_step(trainer.ctx, [first, second], trainer.schedules.at(0), 0)
    assert len(states) == 2 and len(returned) == 2
    for key, value in metrics.items():  # the mean of what the objective reported for each micro-batch
        torch.testing.assert_close(value, (returned[0][key] + returned[1][key]) / 2, msg=key)

    grads_1, metrics_1 = _step_alone(tmp_path / "first", first, states[0])
    # The step's prototypes are drawn once, at its first micro-batch: the second replays with that draw.
    grads_2, metrics_2 = _step_alone(tmp_path / "second", second, (states[0][0], states[1][1]))

    assert grads.keys() == grads_1.keys() == grads_2.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, (grads_1[name] + grads_2[name]) / 2, atol=1e-6, rtol=1e-4, msg=name)
    assert metrics.keys() == metrics_1.keys() and "loss" in metrics
    for key, value in metrics.items():
        torch.testing.assert_close(value, (metrics_1[key] + metrics_2[key]) / 2, msg=key)


def test_gradients_are_released_after_the_update(tmp_path: Path) -> None:
    # A zero gradient left behind is not harmless: AdamW would decay and move a parameter that the next
    # step gives no gradient, where None makes it skip the parameter.
    trainer = _trainer(tmp_path)
    train_step(trainer.ctx, _batches(trainer, 1), trainer.schedules.at(0), 0)
    assert all(p.grad is None for p in trainer.model.student.parameters())


def _poisoned(trainer: Trainer) -> list[Batch]:
    (batch,) = _batches(trainer, 1)
    batch.crops[0][0, 0, 0, 0] = float("nan")
    return [batch]


def test_a_skipped_step_changes_nothing_and_leaves_no_gradient(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.on_nan=skip")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    memory = trainer.objective.cls_bank.embeddings.clone()
    metrics = train_step(trainer.ctx, _poisoned(trainer), trainer.schedules.at(0), 0)
    assert metrics.keys() == {"skipped"} and float(metrics["skipped"]) == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert torch.equal(trainer.objective.cls_bank.embeddings, memory)
    assert all(p.grad is None for p in trainer.model.student.parameters())


def test_a_stopped_step_names_the_step_and_the_term(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"^step 7: loss_\w+ is non-finite"):
        train_step(trainer.ctx, _poisoned(trainer), trainer.schedules.at(7), 7)
    assert all(p.grad is None for p in trainer.model.student.parameters())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"loss": 1.0, "loss_cls": 2.0, "loss_patch": 3.0, "entropy": math.nan}, None),  # not a loss term
        ({"loss": math.nan, "loss_cls": 2.0, "loss_patch": 3.0}, "loss"),
        ({"loss": math.nan, "loss_cls": 2.0, "loss_patch": math.inf}, "loss_patch"),
        ({"loss": math.nan, "loss_cls": math.nan, "loss_patch": math.nan}, "loss_cls"),
    ],
)
def test_the_first_non_finite_loss_term_is_named(values: dict[str, float], expected: str | None) -> None:
    assert _check_finite({k: torch.tensor(v) for k, v in values.items()}) == expected


class _RecordingDDP(DistributedDataParallel):
    """A DDP stand-in without a process group: records, per forward, whether gradient sync was off."""

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.module = module
        self.in_no_sync = False
        self.forwards: list[bool] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.forwards.append(self.in_no_sync)
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


def test_ddp_synchronises_gradients_only_on_the_last_micro_batch(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.accum_steps=3")
    ddp = _RecordingDDP(trainer.model.student)
    trainer.ctx.parallel.student = ddp
    train_step(trainer.ctx, _batches(trainer, 3), trainer.schedules.at(0), 0)
    assert ddp.forwards == [True, True, False]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_forward_runs_in_the_configured_precision(tmp_path: Path, precision: str) -> None:
    trainer = _trainer(tmp_path, f"train.precision={precision}")
    seen: list[bool] = []
    loss = trainer.objective.loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return loss(*args, **kwargs)

    trainer.objective.loss = spy  # type: ignore[method-assign]
    train_step(trainer.ctx, _batches(trainer, 1), trainer.schedules.at(0), 0)
    assert seen == [precision == "bf16"]


def test_a_step_skipped_after_an_accumulated_backward_leaves_no_gradient(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.on_nan=skip", "train.accum_steps=2")
    first, second = _batches(trainer, 2)
    second.crops[0][0, 0, 0, 0] = float("nan")  # the first micro-batch's backward already ran
    assert train_step(trainer.ctx, [first, second], trainer.schedules.at(0), 0).keys() == {"skipped"}
    assert all(p.grad is None for p in trainer.model.student.parameters())


def test_the_prototype_layer_is_updated_from_its_last_frozen_step_on(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "method=ibot", "ibot.out_dim=16", "ibot.freeze_last_layer=0.25")
    assert trainer.ctx.frozen == {"head.last_layer.": 2}  # 8 steps an epoch
    named = dict(trainer.model.student.named_parameters())
    layer = named["head.last_layer.parametrizations.weight.original1"]
    moved = []
    for step, batch in enumerate(_batches(trainer, 3)):
        before = layer.detach().clone()
        values = trainer.schedules.at(step)
        set_schedule(trainer.optimizer, values.lr, values.weight_decay)
        train_step(trainer.ctx, [batch], values, step)
        moved.append(not torch.equal(layer, before))
    assert moved == [False, False, True]


@pytest.mark.parametrize("method", ["sop", "ibot", "dino"])
def test_two_micro_batches_train_as_one_batch_of_twice_the_size(tmp_path: Path, method: str) -> None:
    """What J ranks do in one step, J accumulated micro-batches do: same loss, weights and method state
    (SOP's prototypes are drawn once per step, the centres move once per step)."""
    runs = {}
    for name, batch, accum in (("one", 16, 1), ("two", 8, 2)):
        flags = (f"method={method}", f"train.batch_size={batch}", f"train.accum_steps={accum}")
        trainer = _trainer(tmp_path / name, *flags, "train.max_steps=3", "run.log_every=1")
        runs[name] = (trainer.fit(), trainer.model.student.state_dict(), trainer.objective.state_dict())
    (row1, student1, state1), (row2, student2, state2) = runs["one"], runs["two"]
    assert row2["loss"] == pytest.approx(row1["loss"], rel=1e-5)
    for key, value in student1.items():
        torch.testing.assert_close(student2[key], value, rtol=1e-4, atol=1e-6, msg=key)
    for key, value in state1.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(state2[key], value, rtol=1e-4, atol=1e-6, msg=key)
