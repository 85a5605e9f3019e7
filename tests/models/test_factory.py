"""Architecture table: every name builds, forwards at two resolutions and rejects bad input."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

from sopvit.models import ARCHS, available_archs, create_backbone, describe_archs, get_arch_spec
from sopvit.models.factory import resolve_timm_kwargs

VIT_ARCHS = [name for name in available_archs() if ARCHS[name].kind == "vit"]
SWIN_ARCHS = [name for name in available_archs() if ARCHS[name].kind == "swin"]

EXPECTED = {
    "vit_tiny_patch16_224": (192, 16),
    "vit_small_patch16_224": (384, 16),
    "vit_base_patch16_224": (768, 16),
    "vit_large_patch16_224": (1024, 16),
    "vit_huge_patch14_224": (1280, 14),
    "vit_giant_patch14_224": (1536, 14),
    "vit_tiny_patch8_224": (192, 8),
    "vit_small_patch8_224": (384, 8),
    "vit_base_patch8_224": (768, 8),
    "vit_large_patch8_224": (1024, 8),
    "vit_demo": (192, 4),
    "vit_test": (32, 4),
    "swin_tiny_patch4_window7_224": (768, 32),
    "swin_tiny_patch4_window14_224": (768, 32),
}


def test_table_is_complete() -> None:
    assert set(EXPECTED) == set(available_archs())
    assert all(name in describe_archs() for name in available_archs())


@pytest.mark.parametrize("arch", VIT_ARCHS)
def test_vit_arch_builds_and_forwards(arch: str) -> None:
    dim, patch = EXPECTED[arch]
    # A 4x4 grid and 2 blocks keep even ViT-L cheap; the table entry (width, heads, patch) is what is tested.
    size = 4 * patch
    backbone = create_backbone(arch, img_size=size, depth=2).eval()
    assert backbone.embed_dim == dim and backbone.patch_size == patch
    timm_name, kwargs = resolve_timm_kwargs(arch)
    assert kwargs["dynamic_img_size"] and kwargs["img_size"] == ARCHS[arch].img_size
    assert timm_name in timm.list_models()
    assert not any(isinstance(m, timm.layers.DropPath) for m in backbone.modules())
    with torch.no_grad():
        for res in (size, size // 2):
            out = backbone(torch.randn(1, 3, res, res))
            gh, gw = backbone.grid_size(res)
            assert out["cls"].shape == (1, dim)
            assert out["patch"].shape == (1, gh * gw, dim)


@pytest.mark.parametrize("arch", SWIN_ARCHS)
def test_swin_arch_forwards_at_224_and_96(arch: str) -> None:
    backbone = create_backbone(arch).eval()
    assert backbone.embed_dim == 768 and backbone.patch_size == 32
    assert backbone.grid_size(224) == (7, 7) and backbone.grid_size(96) == (3, 3)
    with torch.no_grad():
        for res, grid in ((224, 7), (96, 3)):
            out = backbone(torch.randn(1, 3, res, res))
            assert out["cls"].shape == (1, 768)
            assert out["patch"].shape == (1, grid * grid, 768)
            assert torch.isfinite(out["patch"]).all()


def test_demo_arch_handles_28_and_14_px_grayscale() -> None:
    backbone = create_backbone("vit_demo", in_chans=1).eval()
    assert backbone.grid_size(28) == (7, 7)
    assert backbone.grid_size(14) == (4, 4)  # dynamic padding 14 -> 16
    with torch.no_grad():
        assert backbone(torch.randn(2, 1, 14, 14))["patch"].shape == (2, 16, 192)


def test_overrides_and_drop_path() -> None:
    overrides = {"embed_dim": 48, "depth": 3, "num_heads": 4, "patch_size": 8}
    backbone = create_backbone("vit_test", drop_path_rate=0.2, **overrides)
    assert backbone.embed_dim == 48 and backbone.patch_size == 8 and len(backbone.model.blocks) == 3  # type: ignore[arg-type]
    assert any(isinstance(m, timm.layers.DropPath) for m in backbone.modules())
    assert backbone.timm_kwargs["pretrained"] is False and backbone.timm_kwargs["num_classes"] == 0
    assert backbone.model.num_classes == 0


def test_unknown_arch_suggests_closest_name() -> None:
    with pytest.raises(ValueError, match="vit_small_patch16_224") as info:
        get_arch_spec("vit_smal_patch16_224")
    assert "Did you mean" in str(info.value)
    with pytest.raises(ValueError, match="Valid names"):
        create_backbone("resnet50")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"patch_size": 0}, ValueError),
        ({"depth": -1}, ValueError),
        ({"drop_path_rate": 1.5}, ValueError),
        ({"class_token": False}, ValueError),
        ({"pretrained": True}, ValueError),
    ],
)
def test_invalid_overrides(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        resolve_timm_kwargs("vit_test", **kwargs)


def test_swin_rejects_vit_style_depth() -> None:
    with pytest.raises(ValueError, match="depths"):
        resolve_timm_kwargs("swin_tiny_patch4_window7_224", depth=4)
