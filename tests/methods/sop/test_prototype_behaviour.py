"""Prototype building pinned to METHOD.md: argument ranges, low-CV ranking and order, generator use."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from sopvit import build_prototypes
from sopvit.methods.sop import Prototypes, build_prototype_tasks
from tests.methods.sop.reference import reference_supports


def _memory(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1
    )


def _anchors_drawn(n: int, a: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:a].tolist()


def _cv(memory: torch.Tensor, anchors: list[int], k: int) -> dict[int, float]:
    out = {}
    for a, (_, scores) in zip(anchors, reference_supports(memory, anchors, k)):
        s = torch.tensor(scores, dtype=torch.float64)
        out[a] = (s.std() / s.mean().abs()).item()
    return out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_anchors": 1}, "at least 2"),  # one anchor is a valid draw, but makes a single prototype
        ({"keep_fraction": 0.0}, "keep_fraction must be in"),
        ({"keep_fraction": 1.5}, "keep_fraction must be in"),
    ],
)
def test_argument_ranges(kwargs: dict, message: str) -> None:
    args = {"n_anchors": 4, "k": 2, "smoothing": 0.1, "keep_fraction": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        build_prototypes(_memory(10, 3), generator=torch.Generator(), **args)


def test_low_cv_ranks_by_coefficient_of_variation_not_by_spread() -> None:
    memory = _memory(30, 16, seed=1)  # sparse: neighbour similarities and their means vary a lot
    anchors = _anchors_drawn(30, 12, 2)
    cv = _cv(memory, anchors, 3)
    spread = {
        a: torch.tensor(s, dtype=torch.float64).std().item()
        for a, (_, s) in zip(anchors, reference_supports(memory, anchors, 3))
    }
    by_cv, by_spread = sorted(cv, key=cv.get)[:4], sorted(spread, key=spread.get)[:4]
    assert set(by_cv) != set(by_spread)  # the case tells the two rules apart
    protos = build_prototypes(memory, 12, 3, 0.1, 4 / 12, torch.Generator().manual_seed(2), "low_cv")
    assert protos.anchor_index.tolist() == by_cv  # most homogeneous first


def test_low_cv_keeping_every_anchor_orders_them_by_coefficient_of_variation() -> None:
    memory = _memory(40, 6, seed=3)
    anchors = _anchors_drawn(40, 6, 4)
    cv = _cv(memory, anchors, 2)
    protos = build_prototypes(memory, 6, 2, 0.1, 1.0, torch.Generator().manual_seed(4), "low_cv")
    assert protos.anchor_index.tolist() == sorted(cv, key=cv.get)


def test_low_cv_with_two_neighbours_may_drop_anchors() -> None:
    protos = build_prototypes(_memory(40, 6), 6, 2, 0.1, 0.5, torch.Generator().manual_seed(0), "low_cv")
    assert protos.num_prototypes == 3


def test_low_cv_without_neighbours_names_k() -> None:
    with pytest.raises(ValueError, match="got k=0"):
        build_prototypes(_memory(20, 3), 4, 0, 0.1, 0.5, torch.Generator(), anchor_selection="low_cv")


def test_one_task_is_task_zero_of_a_batch_and_draws_the_same_numbers() -> None:
    memory = _memory(50, 5)
    g_one, g_batch = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one = build_prototypes(memory, 8, 2, 0.1, 0.5, g_one)
    batch = build_prototype_tasks(memory, 1, 8, 2, 0.1, 0.5, g_batch)
    for f in fields(Prototypes):
        assert torch.equal(getattr(one, f.name), getattr(batch, f.name)[0]), f.name
    assert torch.equal(g_one.get_state(), g_batch.get_state())
