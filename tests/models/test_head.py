"""Projection head: architecture, initialisation and normalised output on any leading shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sopvit.models import ProjectionHead


def test_default_architecture_and_init() -> None:
    head = ProjectionHead(384)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    for linear in linears:
        assert linear.bias is not None and torch.count_nonzero(linear.bias) == 0
        assert linear.weight.abs().max() < 0.2  # trunc_normal_ bounds are absolute (+-2), as in DINO
        assert 0.015 < linear.weight.std().item() < 0.025


@settings(max_examples=20, deadline=None, derandomize=True)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), layers=st.integers(1, 4))
def test_output_is_unit_norm_for_any_leading_shape(lead: list[int], layers: int) -> None:
    head = ProjectionHead(8, hidden_dim=16, bottleneck_dim=4, n_layers=layers)
    out = head(torch.randn(*lead, 8))
    assert out.shape == (*lead, 4)
    assert torch.allclose(out.norm(dim=-1), torch.ones(lead), atol=1e-5)


def test_zero_input_stays_finite_and_bf16_output_is_float32() -> None:
    head = ProjectionHead(8, hidden_dim=16, bottleneck_dim=4)
    for linear in head.mlp:
        if isinstance(linear, nn.Linear):
            nn.init.zeros_(linear.weight)
    assert torch.isfinite(head(torch.zeros(2, 8))).all()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ProjectionHead(8, hidden_dim=16, bottleneck_dim=4)(torch.randn(3, 5, 8))
    assert out.dtype == torch.float32


def test_gradient_flows() -> None:
    head = ProjectionHead(8, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(5, 8, requires_grad=True)
    (head(x) @ torch.randn(4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_dim": 0},
        {"in_dim": 8, "n_layers": 0},
        {"in_dim": 8, "bottleneck_dim": 2.5},
        {"in_dim": 8, "eps": 0},
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ProjectionHead(**kwargs)


def test_wrong_input_width() -> None:
    with pytest.raises(ValueError, match="last dim 8"):
        ProjectionHead(8, hidden_dim=16, bottleneck_dim=4)(torch.randn(2, 7))
