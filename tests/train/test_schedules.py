import pytest

from sopvit.optim.schedules import cosine, linear_then_constant
from sopvit.train.schedules import Schedules


def test_cosine_with_warmup_endpoints() -> None:
    assert cosine(0, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.0, warmup=10) == pytest.approx(1.0)
    assert cosine(55, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine(100, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.0)
    assert cosine(500, 100, 1.0, 0.0) == pytest.approx(0.0)


def test_teacher_temperature_warmup() -> None:
    assert linear_then_constant(0, 10, 0.04, 0.07) == 0.04
    assert linear_then_constant(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_then_constant(20, 10, 0.04, 0.07) == 0.07


def test_schedule_bundle() -> None:
    s = Schedules(100, 1e-3, 1e-6, 10, 0.04, 0.4, 0.996, 1.0, 0.07, 0.04, 30)
    start, end = s.at(0), s.at(100)
    assert start.lr == 0.0 and end.lr == pytest.approx(1e-6)
    assert start.weight_decay == pytest.approx(0.04) and end.weight_decay == pytest.approx(0.4)
    assert start.momentum == pytest.approx(0.996) and end.momentum == pytest.approx(1.0)
    assert start.teacher_temp == 0.04 and end.teacher_temp == 0.07
    assert end.patch_teacher_temp == end.teacher_temp  # follows [CLS] unless set
    separate = Schedules(100, 1e-3, 1e-6, 10, 0.04, 0.4, 0.996, 1.0, 0.07, 0.04, 30, patch_teacher_temp=0.05)
    assert separate.at(100).patch_teacher_temp == 0.05
