"""Optimizer groups, schedule application and per-parameter clipping pinned to their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sopvit.optim.groups import build_optimizer, clip_per_parameter, param_groups, set_schedule


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_biases_and_norms_are_never_decayed_and_frozen_parameters_are_left_out() -> None:
    net = _Net()
    decay, no_decay = param_groups(net)
    assert decay["apply_wd"] is True and no_decay["apply_wd"] is False and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(net.cls_token), id(net.pos_embed), id(net.proj.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(net.proj.bias), id(net.norm.weight), id(net.norm.bias)]


def test_adamw_and_the_schedule_touch_the_right_groups() -> None:
    opt = build_optimizer(_Net(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and not opt.defaults["fused"]
    set_schedule(opt, 0.5, 0.04)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]


def test_each_gradient_is_clipped_to_the_norm_on_its_own() -> None:
    big, small, none = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    big.grad = torch.tensor([3.0, 4.0])  # norm 5
    small.grad = torch.tensor([0.3, 0.4])  # norm 0.5, left alone
    clip_per_parameter([big, small, none], 1.0)
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))
    assert none.grad is None


def test_the_learning_rate_is_zero_until_the_schedule_sets_it() -> None:
    opt = build_optimizer(_Net(), torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]


def test_groups_without_apply_wd_get_the_scheduled_weight_decay() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    set_schedule(opt, 0.3, 0.05)
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_the_epsilon_only_guards_against_a_zero_norm() -> None:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([2e-6, 0.0])  # norm 2e-6, clipped to 1e-6: scaled by 1e-6 / (2e-6 + 1e-6)
    clip_per_parameter([p], 1e-6)
    assert p.grad[0].item() == pytest.approx(2e-6 / 3, rel=1e-4)


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_a_non_positive_norm_switches_clipping_off(max_norm: float) -> None:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    clip_per_parameter([p], max_norm)
    assert p.grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    "module", [nn.LayerNorm(4), nn.Linear(4, 4, bias=False)], ids=["1-D only", "2-D only"]
)
def test_both_groups_exist_even_when_one_is_empty(module: nn.Module) -> None:
    # The group order is part of a saved optimizer state: an empty group keeps its place.
    groups = param_groups(module)
    assert [g["apply_wd"] for g in groups] == [True, False]
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    build_optimizer(module, torch.device("cpu")).step()
