"""Schedules pinned to their formulas at every step, not only at the end points."""

from __future__ import annotations

import math

import pytest

from sopvit.optim.schedules import cosine, linear_then_constant
from sopvit.train.schedules import Schedules


@pytest.mark.parametrize("step", [0, 3, 10, 11, 37, 64, 99, 100, 130])
def test_cosine_with_warmup_follows_its_formula(step: int) -> None:
    total, warmup, start, end, warm = 100, 10, 2.0, 0.5, 0.25
    if step < warmup:
        expected = warm + (start - warm) * step / warmup
    else:
        progress = min((step - warmup) / (total - warmup), 1.0)
        expected = end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
    assert cosine(step, total, start, end, warmup, warm) == pytest.approx(expected, rel=1e-12)


def test_cosine_without_warmup_and_with_a_warmup_as_long_as_the_run() -> None:
    assert cosine(0, 10, 1.0, 0.0) == 1.0
    assert cosine(5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(10, 10, 1.0, 0.0, warmup=10) == 1.0  # nothing left to decay over: the span is 1
    assert cosine(11, 10, 1.0, 0.0, warmup=10) == pytest.approx(0.0)
    assert cosine(-1, 10, 1.0, 0.0) == 1.0  # before the first step, without a warm-up: the start


@pytest.mark.parametrize("step", [0, 1, 7, 9])
def test_linear_then_constant_follows_its_formula(step: int) -> None:
    assert linear_then_constant(step, 10, 0.04, 0.07) == pytest.approx(0.04 + 0.03 * step / 10)
    assert linear_then_constant(10, 10, 0.04, 0.07) == 0.07
    assert linear_then_constant(3, 0, 0.04, 0.07) == 0.07
    assert linear_then_constant(0, 1, 0.04, 0.07) == 0.04  # a one-step warm-up still starts at the start
    assert linear_then_constant(0, -1, 0.04, 0.07) == 0.07


def test_schedule_bundle_mid_run() -> None:
    s = Schedules(100, 1e-3, 1e-6, 10, 0.04, 0.4, 0.996, 1.0, 0.07, 0.04, 30, 0.05, 0.03)
    v = s.at(20)
    assert v.lr == pytest.approx(cosine(20, 100, 1e-3, 1e-6, 10))
    assert v.weight_decay == pytest.approx(cosine(20, 100, 0.04, 0.4))
    assert v.momentum == pytest.approx(cosine(20, 100, 0.996, 1.0))
    assert v.teacher_temp == pytest.approx(0.04 + 0.03 * 20 / 30)
    assert v.patch_teacher_temp == pytest.approx(0.03 + 0.02 * 20 / 30)
    # without its own warm-up start, the patch temperature warms up from its final value (constant)
    assert (
        Schedules(100, 1e-3, 1e-6, 10, 0.04, 0.4, 0.996, 1.0, 0.07, 0.04, 30, 0.05).at(5).patch_teacher_temp
        == 0.05
    )


def test_a_one_step_warmup_starts_at_its_start_and_the_warmup_ends_exactly_at_the_peak() -> None:
    assert cosine(0, 10, 1.0, 0.0, warmup=1, warmup_start=0.25) == 0.25
    # the first step after the warm-up is the cosine's start itself, not the warm-up line's rounding of it
    assert 0.2 + (0.9 - 0.2) * 10 / 10 != 0.9
    assert cosine(10, 100, 0.9, 0.0, warmup=10, warmup_start=0.2) == 0.9
