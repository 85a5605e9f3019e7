"""The pre-training schedules (lr, weight decay, EMA momentum, teacher temperatures), iteration-indexed:
every value is a pure function of the global step."""

from __future__ import annotations

from dataclasses import dataclass

from sopvit.methods.interface import ScheduleValues
from sopvit.optim.schedules import cosine, linear_then_constant
from sopvit.recipe.config import TrainConfig


@dataclass(frozen=True)
class Schedules:
    """All pre-training schedules, in steps (optimizer updates)."""

    total_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int
    patch_teacher_temp: float | None = None
    warmup_patch_teacher_temp: float | None = None

    @classmethod
    def for_run(cls, t: TrainConfig, steps_per_epoch: int, total_steps: int, global_batch: int) -> Schedules:
        """The schedules of ``train.*`` in steps: epochs become steps, the lr scales with the global batch
        (``train.lr`` is for 256 images)."""
        return cls(
            total_steps=total_steps,
            lr=t.lr * global_batch / 256,
            min_lr=t.min_lr,
            warmup_steps=round(t.warmup_epochs * steps_per_epoch),
            weight_decay=t.weight_decay,
            weight_decay_end=t.weight_decay_end,
            momentum=t.momentum,
            momentum_end=t.momentum_end,
            teacher_temp=t.teacher_temp,
            warmup_teacher_temp=t.warmup_teacher_temp,
            teacher_temp_warmup_steps=round(t.warmup_teacher_temp_epochs * steps_per_epoch),
            patch_teacher_temp=t.patch_teacher_temp,
        )

    def at(self, step: int) -> ScheduleValues:
        teacher = linear_then_constant(
            step, self.teacher_temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp
        )
        if self.patch_teacher_temp is None:
            patch = teacher
        else:
            patch = linear_then_constant(
                step,
                self.teacher_temp_warmup_steps,
                self.warmup_patch_teacher_temp or self.patch_teacher_temp,
                self.patch_teacher_temp,
            )
        return ScheduleValues(
            step=step,
            lr=cosine(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps),
            weight_decay=cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            momentum=cosine(step, self.total_steps, self.momentum, self.momentum_end),
            teacher_temp=teacher,
            patch_teacher_temp=patch,
        )
