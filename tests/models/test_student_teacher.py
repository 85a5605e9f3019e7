"""Student/teacher encoders: outputs, multi-crop batching, EMA update and checkpoint export."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import timm
import torch
import torch.distributed as dist
from torch import Tensor

from sopvit.models import StudentTeacher

HEAD = {"head_hidden": 64, "head_bottleneck": 16}


def _model(**kwargs: Any) -> StudentTeacher:
    torch.manual_seed(0)
    return StudentTeacher.create("vit_test", **{**HEAD, **kwargs})


def _params(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_create_builds_identical_teacher_without_drop_path() -> None:
    st = _model(drop_path_rate=0.2)
    assert any(isinstance(m, timm.layers.DropPath) for m in st.student.modules())
    assert not any(isinstance(m, timm.layers.DropPath) for m in st.teacher.modules())
    s, t = _params(st.student), _params(st.teacher)
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in st.teacher.parameters())
    st.train()
    assert st.student.training and not st.teacher.training


@pytest.mark.parametrize("res", [32, 16])
def test_encoder_outputs(res: int) -> None:
    st = _model()
    grid = st.student.backbone.grid_size(res)
    mask = torch.zeros(3, *grid, dtype=torch.bool)
    mask[:, 0] = True
    out = st.student(torch.randn(3, 3, res, res), mask)
    n = grid[0] * grid[1]
    assert out["cls"].shape == (3, 16) and out["patch"].shape == (3, n, 16)
    assert out["cls_feat"].shape == (3, 32) and out["patch_feat"].shape == (3, n, 32)
    assert torch.allclose(out["cls"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["patch"].norm(dim=-1), torch.ones(3, n), atol=1e-5)
    # The head is shared: projecting the backbone [CLS] again gives the same embedding.
    assert torch.allclose(st.student.head(out["cls_feat"]), out["cls"], atol=1e-6)


def test_multicrop_list_matches_separate_calls() -> None:
    st = _model()
    enc = st.teacher  # eval mode, deterministic
    globals_ = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    locals_ = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    masks: list[Tensor | None] = [torch.rand(2, 8, 8) < 0.5, None, None, None, None]
    with torch.no_grad():
        outs = enc([*globals_, *locals_], masks)
        separate = [enc(globals_[0], masks[0]), enc(globals_[1])] + [enc(x) for x in locals_]
    assert len(outs) == 5
    for got, want in zip(outs, separate):
        assert got.keys() == want.keys()
        for key in got:
            assert (got[key] - want[key]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="entries"):
        enc(globals_, [None])


def test_ema_momentum_extremes_and_midpoint() -> None:
    st = _model()
    teacher0 = _params(st.teacher)
    with torch.no_grad():
        for p in st.student.parameters():
            p.add_(torch.randn_like(p))
    student = _params(st.student)
    st.update_teacher(1.0)
    assert all(torch.equal(v, teacher0[k]) for k, v in _params(st.teacher).items())
    st.update_teacher(0.5)
    mid = _params(st.teacher)
    for k in st.ema_parameter_names():
        assert torch.allclose(mid[k], 0.5 * (teacher0[k] + student[k]), atol=1e-6)
    st.update_teacher(0.0)
    after = _params(st.teacher)
    assert all(torch.equal(after[k], student[k]) for k in st.ema_parameter_names())
    # The mask token is student-only: the teacher never masks, so its copy is never averaged.
    assert "backbone.mask_token" not in st.ema_parameter_names()
    assert torch.equal(after["backbone.mask_token"], teacher0["backbone.mask_token"])
    assert all(p.grad is None for p in st.teacher.parameters())
    with pytest.raises(ValueError, match="momentum"):
        st.update_teacher(1.5)


def test_training_step_leaves_teacher_without_grad() -> None:
    st = _model()
    opt = torch.optim.SGD(list(st.parameters_to_train()), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.5
    with torch.no_grad():
        target = st.teacher(x)["patch"]
    loss = -(st.student(x, mask)["patch"] * target).sum(-1).mean()
    loss.backward()
    assert st.student.backbone.mask_token.grad is not None
    assert all(p.grad is None for p in st.teacher.parameters())
    opt.step()
    before = _params(st.teacher)
    st.update_teacher(0.9)
    assert any(not torch.equal(before[k], v) for k, v in _params(st.teacher).items())


def test_ema_lists_follow_device_moves() -> None:
    st = _model()
    st.update_teacher(0.5)
    st.to(torch.float64)
    with torch.no_grad():
        for p in st.student.parameters():
            p.fill_(1.0)
    st.update_teacher(0.0)
    assert all(torch.all(p == 1.0) for n, p in st.teacher.named_parameters() if n != "backbone.mask_token")


def test_teacher_backbone_state_dict_loads_into_timm() -> None:
    st = _model()
    state = st.teacher_backbone_state_dict()
    backbone = st.teacher.backbone
    assert backbone.timm_name is not None
    model: Any = timm.create_model(backbone.timm_name, **backbone.timm_kwargs)
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval().forward_features(x)[:, 0] - st.teacher(x)["cls_feat"]).abs().max() < 1e-5


def test_mismatched_pair_and_direct_call_are_rejected() -> None:
    with pytest.raises(ValueError, match="identical"):
        StudentTeacher(_model().student, _model(embed_dim=48, num_heads=2).teacher)
    with pytest.raises(RuntimeError, match="container"):
        _model()(torch.randn(1, 3, 32, 32))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_wrapped_student_single_process() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            st = _model()
            ddp = torch.nn.parallel.DistributedDataParallel(st.student)
            crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
            outs = ddp(crops, [torch.rand(2, 8, 8) < 0.5, None])
            sum(o["patch"].sum() + o["cls"].sum() for o in outs).backward()
            with torch.no_grad():
                for p in st.student.parameters():
                    p.add_(1.0)
            st.update_teacher(0.0)
            t, s = _params(st.teacher), _params(st.student)
            assert all(torch.equal(t[k], s[k]) for k in st.ema_parameter_names())
        finally:
            dist.destroy_process_group()


def test_selected_tokens_equal_the_full_head_output_at_those_positions() -> None:
    torch.manual_seed(0)
    pair = StudentTeacher.create("vit_test", 16, 1, 0.0, 32, 16)
    crops = [torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16), torch.randn(3, 1, 8, 8)]
    select = torch.rand(6, 16) < 0.4
    full = pair.teacher(torch.cat(crops[:2]))
    picked = pair.teacher(torch.cat(crops[:2]), select=select)
    torch.testing.assert_close(picked["patch"], full["patch"][select])
    torch.testing.assert_close(picked["cls"], full["cls"])
    per_crop = pair.teacher(crops, select=[select[:3], select[3:], None])
    torch.testing.assert_close(per_crop[1]["patch"], full["patch"][3:][select[3:]])
    assert per_crop[2]["patch"].shape == (0, 16)


def test_explicit_and_fused_attention_agree() -> None:
    torch.manual_seed(0)
    pair = StudentTeacher.create("vit_test", 16, 1, 0.0, 32, 16)
    x = torch.randn(2, 1, 16, 16)
    fused = pair.teacher(x)["cls"]
    pair.teacher.backbone.set_fused_attention(False)
    torch.testing.assert_close(pair.teacher(x)["cls"], fused, atol=1e-5, rtol=1e-5)
