"""Weight decay falls on the parameters the reference code decays, and the schedule moves only those.

The reference rule (DINO/iBOT/SOP ``utils.get_params_groups``) is written out here on its own:
a trainable parameter is decayed unless its name ends in ``.bias`` or it is 1-D. So the [CLS]
token, the position embedding and the mask token are decayed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sopvit.models import create_backbone
from sopvit.optim.groups import build_optimizer, param_groups, set_schedule
from sopvit.recipe.build import build_model
from tests.train.tiny import tiny_config


def reference_decays(name: str, param: nn.Parameter) -> bool:
    """``utils.get_params_groups`` of DINO/iBOT/SOP: biases and 1-D parameters are not regularized."""
    return not (name.endswith(".bias") or param.ndim == 1)


def _group_names(model: nn.Module) -> tuple[list[str], list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, kept = param_groups(model)
    assert decayed["apply_wd"] is True and kept["apply_wd"] is False and kept["weight_decay"] == 0.0
    return [names[id(p)] for p in decayed["params"]], [names[id(p)] for p in kept["params"]]


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config(tmp_path_factory.mktemp("run"))).student


def test_student_groups_follow_the_reference_rule(student: nn.Module) -> None:
    decayed, kept = _group_names(student)
    params = dict(student.named_parameters())
    assert decayed == [n for n, p in params.items() if reference_decays(n, p)]  # named_parameters order
    assert kept == [n for n, p in params.items() if not reference_decays(n, p)]
    assert sorted(decayed + kept) == sorted(params)  # every trainable parameter exactly once


def test_tokens_and_position_embedding_are_decayed(student: nn.Module) -> None:
    decayed, kept = _group_names(student)
    for name in ("backbone.mask_token", "backbone.model.cls_token", "backbone.model.pos_embed"):
        assert name in decayed
    assert "backbone.model.blocks.0.attn.qkv.weight" in decayed and "head.mlp.0.weight" in decayed
    assert "backbone.model.blocks.0.norm1.weight" in kept and "backbone.model.norm.bias" in kept
    assert "head.mlp.0.bias" in kept


def test_frozen_parameters_are_left_out(tmp_path: Path) -> None:
    model = build_model(tiny_config(tmp_path))  # the teacher does not train
    decayed, kept = _group_names(model)
    assert decayed + kept and all(n.startswith("student.") for n in decayed + kept)


def test_swin_groups_follow_the_reference_rule() -> None:
    swin = create_backbone(
        "swin_tiny_patch4_window7_224",
        img_size=64,
        embed_dim=24,
        depths=(1, 1, 2, 2),
        num_heads=(1, 1, 2, 2),
    )
    decayed, kept = _group_names(swin)
    params = dict(swin.named_parameters())
    assert decayed == [n for n, p in params.items() if reference_decays(n, p)]
    assert kept == [n for n, p in params.items() if not reference_decays(n, p)]
    assert "mask_token" in decayed
    assert "model.layers.0.blocks.0.attn.relative_position_bias_table" in decayed


def test_set_schedule_sets_weight_decay_of_the_decayed_group_only(student: nn.Module) -> None:
    optimizer = build_optimizer(student, torch.device("cpu"))
    set_schedule(optimizer, lr=0.1, weight_decay=0.3)
    decayed, kept = optimizer.param_groups
    assert (decayed["lr"], decayed["weight_decay"]) == (0.1, 0.3)
    assert (kept["lr"], kept["weight_decay"]) == (0.1, 0.0)


def test_a_step_shrinks_exactly_the_decayed_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = build_model(tiny_config(tmp_path)).student
    optimizer = build_optimizer(student, torch.device("cpu"))
    set_schedule(optimizer, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for p in student.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient moves nothing: only decoupled decay acts
    optimizer.step()
    for name, p in student.named_parameters():
        factor = 1 - 0.1 * 0.5 if reference_decays(name, p) else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=0, msg=name)
