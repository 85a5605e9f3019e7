"""ProjectionHead's optional weight-normalised prototype layer (DINO / iBOT) and the unchanged SOP head."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sopvit.models import ProjectionHead

G_KEY = "last_layer.parametrizations.weight.original0"  # magnitude g, (P, 1)
V_KEY = "last_layer.parametrizations.weight.original1"  # direction v, (P, bottleneck)


def _head(seed: int = 0, **kwargs: Any) -> ProjectionHead:
    torch.manual_seed(seed)
    return ProjectionHead(8, hidden_dim=16, bottleneck_dim=4, **kwargs)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_without_prototypes_the_head_is_the_old_one(n_layers: int) -> None:
    head = ProjectionHead(8, hidden_dim=16, bottleneck_dim=4, n_layers=n_layers)
    expected = [f"mlp.{2 * i}.{p}" for i in range(n_layers) for p in ("weight", "bias")]
    assert list(head.state_dict()) == expected
    assert [n for n, _ in head.named_parameters()] == expected
    assert [n for n, _ in head.named_modules()] == ["", "mlp", *[f"mlp.{i}" for i in range(2 * n_layers - 1)]]
    assert head.last_layer is None and head.out_dim == 4
    out = head(torch.randn(3, 8))
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_prototypes_leave_mlp_initialisation_unchanged() -> None:
    plain = _head(seed=3)
    with_prototypes = _head(seed=3, n_prototypes=10)
    for key, value in plain.state_dict().items():
        assert torch.equal(with_prototypes.state_dict()[key], value), key
    # Same random stream as before up to the prototype layer, which is built last.
    torch.manual_seed(3)
    ProjectionHead(8, hidden_dim=16, bottleneck_dim=4)
    after_plain = torch.rand(1)
    _head(seed=3)
    assert torch.equal(torch.rand(1), after_plain)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 4)])
def test_logit_shape_and_dtype(lead: tuple[int, ...]) -> None:
    head = _head(n_prototypes=10)
    assert head.out_dim == 10
    x = torch.randn(*lead, 8)
    out = head(x)
    assert out.shape == (*lead, 10) and out.dtype == torch.float32
    # logits are cosines between the normalised bottleneck and unit-norm prototypes
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.state_dict()[V_KEY]
    torch.testing.assert_close(out, z @ F.normalize(w, dim=-1).T)
    assert out.abs().max() <= 1 + 1e-5
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.float32


def test_layer_is_weight_normalised_with_unit_magnitude() -> None:
    head = _head(n_prototypes=10)
    assert isinstance(head.last_layer, nn.Linear)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    assert head.last_layer.bias is None
    sd = head.state_dict()
    assert sd[G_KEY].shape == (10, 1) and torch.equal(sd[G_KEY], torch.ones(10, 1))
    assert sd[V_KEY].shape == (10, 4)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))
    # every parameter of the layer is named "last_layer..." (the reference freezes it by that name)
    names = [n for n, _ in head.named_parameters() if not n.startswith("mlp.")]
    assert names == [G_KEY, V_KEY]
    # direction kept nn.Linear's default initialisation (not trunc_normal std 0.02), as in the reference
    bound = 1 / 4**0.5
    assert sd[V_KEY].abs().max() <= bound and sd[V_KEY].std() > 0.1


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_magnitude_frozen_only_with_norm_last_layer(norm_last_layer: bool) -> None:
    head = _head(n_prototypes=6, norm_last_layer=norm_last_layer)
    params = dict(head.named_parameters())
    assert params[G_KEY].requires_grad is not norm_last_layer
    assert params[V_KEY].requires_grad
    head(torch.randn(4, 8)).square().sum().backward()
    v_grad, g_grad = params[V_KEY].grad, params[G_KEY].grad
    assert v_grad is not None and v_grad.abs().sum() > 0
    if norm_last_layer:
        assert g_grad is None
    else:
        assert g_grad is not None and g_grad.abs().sum() > 0
    assert params["mlp.0.weight"].grad is not None


def test_deepcopy_is_independent_and_equal() -> None:
    head = _head(n_prototypes=7, norm_last_layer=False)
    clone = copy.deepcopy(head)
    x = torch.randn(3, 8)
    assert torch.equal(clone(x), head(x))
    assert parametrize.is_parametrized(clone.last_layer, "weight")  # type: ignore[arg-type]
    with torch.no_grad():
        dict(clone.named_parameters())[V_KEY].add_(1.0)
    assert not torch.equal(clone(x), head(x))
    assert torch.equal(head.state_dict()[V_KEY], _head(n_prototypes=7).state_dict()[V_KEY])
    assert dict(clone.named_parameters())[G_KEY].requires_grad


def test_state_dict_round_trip_between_two_heads() -> None:
    a = _head(seed=1, n_prototypes=9)
    b = _head(seed=2, n_prototypes=9)
    x = torch.randn(4, 8)
    assert not torch.equal(a(x), b(x))
    with torch.no_grad():
        dict(a.named_parameters())[G_KEY].mul_(2.0)  # a non-unit magnitude must travel too
    b.load_state_dict(a.state_dict())
    assert list(b.state_dict()) == list(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert not dict(b.named_parameters())[G_KEY].requires_grad  # loading keeps the freeze


def test_foreach_lerp_over_named_parameters_moves_the_teacher() -> None:
    student = _head(seed=1, n_prototypes=5, norm_last_layer=False)
    teacher = _head(seed=2, n_prototypes=5, norm_last_layer=False)
    with torch.no_grad():
        dict(student.named_parameters())[G_KEY].fill_(3.0)
    s_params = dict(student.named_parameters())
    names = [n for n, _ in teacher.named_parameters()]
    assert names == list(s_params)
    t_list: list[torch.Tensor] = [p for _, p in teacher.named_parameters()]
    s_list: list[torch.Tensor] = [s_params[n] for n in names]
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        torch._foreach_lerp_(t_list, s_list, 0.25)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[n] + 0.25 * s_params[n])
    # the parametrised weight is recomputed from the averaged originals
    g, v = teacher.state_dict()[G_KEY], teacher.state_dict()[V_KEY]
    torch.testing.assert_close(teacher.last_layer.weight, g * v / v.norm(dim=1, keepdim=True))  # type: ignore[union-attr]
    with torch.no_grad():
        torch._foreach_lerp_(t_list, s_list, 1.0)
    x = torch.randn(2, 8)
    torch.testing.assert_close(teacher(x), student(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_prototypes": 0},
        {"n_prototypes": -3},
        {"n_prototypes": True},
        {"n_prototypes": 2.5},
        {"n_prototypes": 4, "norm_last_layer": "yes"},
    ],
)
def test_invalid_prototype_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ProjectionHead(8, hidden_dim=16, bottleneck_dim=4, **kwargs)
