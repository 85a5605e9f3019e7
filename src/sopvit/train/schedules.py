"""Iteration-indexed schedules: every value is a pure function of the global step, so a resumed run
needs only the step to be back on its curves."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(
    step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup`` steps, then cosine to ``end``."""
    if warmup > 0 and step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_then_constant(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, ``end`` afterwards."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    patch_teacher_temp: float


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
            lr=cosine(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps),
            weight_decay=cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            momentum=cosine(step, self.total_steps, self.momentum, self.momentum_end),
            teacher_temp=teacher,
            patch_teacher_temp=patch,
        )
