"""Backbone: timm equivalence, masking semantics, checkpoint compatibility, explicit attention."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import Tensor

from sopvit.models import Backbone, create_backbone

SWIN = "swin_tiny_patch4_window7_224"
# Two blocks per stage's worth of logic at a fraction of the cost of Swin-T.
SMALL_SWIN: dict[str, Any] = {"embed_dim": 24, "depths": (1, 1, 2, 2), "num_heads": (1, 1, 2, 2)}


def _vit(**kwargs: Any) -> Backbone:
    torch.manual_seed(0)
    return create_backbone("vit_test", **kwargs).eval()


def _swin() -> Backbone:
    torch.manual_seed(0)
    return create_backbone(SWIN, img_size=64, **SMALL_SWIN).eval()


def _random_mask(batch: int, grid: tuple[int, int], seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, *grid, generator=gen) < 0.4
    mask[:, 0, 0] = True  # at least one masked and one visible token per image
    mask[:, -1, -1] = False
    return mask


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vit_matches_timm_at_two_resolutions(reg_tokens: int) -> None:
    backbone = _vit(reg_tokens=reg_tokens)
    assert backbone.num_prefix_tokens == 1 + reg_tokens
    with torch.no_grad():
        for res in (32, 16):
            x = torch.randn(2, 3, res, res)
            ref = backbone.model.forward_features(x)
            out = backbone(x)
            gh, gw = backbone.grid_size(res)
            assert out["patch"].shape == (2, gh * gw, 32) and out["cls"].shape == (2, 32)
            assert (backbone.forward_features(x) - ref).abs().max() < 1e-6
            assert (out["cls"] - ref[:, 0]).abs().max() < 1e-6
            assert (out["patch"] - ref[:, 1 + reg_tokens :]).abs().max() < 1e-6


def test_vit_small_224_real_forward_matches_timm() -> None:
    backbone = create_backbone("vit_small_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = backbone(x)
        ref = backbone.model.forward_features(x)
    assert out["patch"].shape == (1, 196, 384)
    assert (out["cls"] - ref[:, 0]).abs().max() < 1e-6


def test_swin_matches_timm_pooling() -> None:
    backbone = _swin()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = backbone.model.forward_features(x)  # (B, h, w, D)
        out = backbone(x)
    assert backbone.grid_size(64) == tuple(ref.shape[1:3]) == (2, 2)
    assert (out["patch"] - ref.flatten(1, 2)).abs().max() < 1e-6
    assert (out["cls"] - ref.mean(dim=(1, 2))).abs().max() < 1e-6
    assert backbone.forward_features(x).shape == (2, 5, backbone.embed_dim)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_masking_semantics(kind: str) -> None:
    backbone = _vit() if kind == "vit" else _swin()
    res = 32 if kind == "vit" else 64
    grid = backbone.grid_size(res)
    x = torch.randn(2, 3, res, res)
    mask = _random_mask(2, grid)
    with torch.no_grad():
        plain = backbone(x)["patch"]
        masked = backbone(x, mask)["patch"]
        none_masked = backbone(x, torch.zeros_like(mask))["patch"]
        # Pixels under masked tokens must not reach the network at all.
        cell = res // grid[0]
        pixel_mask = mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None]
        perturbed = backbone(torch.where(pixel_mask, torch.randn_like(x), x), mask)["patch"]
        flat = backbone(x, mask.flatten(1))["patch"]
    assert torch.equal(none_masked, plain)
    assert not torch.allclose(masked[mask.flatten(1)], plain[mask.flatten(1)], atol=1e-3)
    assert torch.equal(perturbed, masked)
    assert torch.equal(flat, masked)


def test_mask_token_replaces_exactly_the_masked_embeddings() -> None:
    backbone = _vit()
    vit: Any = backbone.model
    captured: list[Tensor] = []
    vit.patch_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    x = torch.randn(1, 3, 32, 32)
    mask = _random_mask(1, (8, 8))
    with torch.no_grad():
        backbone(x)
        backbone(x, mask)
    pos = vit.pos_embed[:, 1:]
    plain, masked = captured[0][:, 1:], captured[1][:, 1:]
    flat = mask.flatten(1)
    token = backbone.mask_token[0, 0] + pos[0][flat[0]]
    assert torch.allclose(masked[flat], token, atol=1e-6)
    assert torch.equal(masked[~flat], plain[~flat])


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_gradient_reaches_mask_token(kind: str) -> None:
    backbone = (_vit() if kind == "vit" else _swin()).train()
    res = 32 if kind == "vit" else 64
    mask = _random_mask(2, backbone.grid_size(res))
    backbone(torch.randn(2, 3, res, res), mask)["patch"].square().sum().backward()
    assert backbone.mask_token.grad is not None and backbone.mask_token.grad.abs().sum() > 0


def test_bad_masks_are_rejected() -> None:
    backbone = _vit()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="bool"):
        backbone(x, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        backbone(x, torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        backbone(torch.randn(3, 32, 32))


@pytest.mark.parametrize(("arch", "kwargs", "res"), [("vit_test", {"reg_tokens": 1}, 32), (SWIN, {}, 96)])
def test_timm_strict_state_dict_round_trip(arch: str, kwargs: dict[str, Any], res: int) -> None:
    backbone = create_backbone(arch, drop_path_rate=0.1, **kwargs).eval()
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    assert backbone.timm_name is not None
    fresh: Any = timm.create_model(backbone.timm_name, **backbone.timm_kwargs).eval()
    ours: Any = backbone.model
    fresh.load_state_dict(state, strict=True)
    assert "mask_token" not in state
    x = torch.randn(1, 3, res, res)
    with torch.no_grad():
        assert (fresh.forward_features(x) - ours.forward_features(x)).abs().max() < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_last_block_attention_matches_timm(fused: bool) -> None:
    backbone = _vit(reg_tokens=1)
    vit: Any = backbone.model
    attn_mod = vit.blocks[-1].attn
    attn_mod.fused_attn = fused
    seen: dict[str, Tensor] = {}
    attn_mod.register_forward_hook(lambda _m, inp, out: seen.update(inp=inp[0], out=out))
    attn_mod.attn_drop.register_forward_hook(lambda _m, inp, _o: seen.update(probs=inp[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        backbone(x)
        attn = backbone.last_block_attention(x)
    assert attn.shape == (2, 2, 66, 66) and attn.dtype == torch.float32
    assert torch.allclose(attn.sum(-1), torch.ones(2, 2, 66), atol=1e-5)
    if not fused:
        assert (attn - seen["probs"]).abs().max() < 1e-6
    # attn @ v through the output projection must reproduce the block's attention output.
    b, n, _ = seen["inp"].shape
    qkv = attn_mod.qkv(seen["inp"]).reshape(b, n, 3, attn_mod.num_heads, attn_mod.head_dim)
    v = qkv.permute(2, 0, 3, 1, 4)[2]
    with torch.no_grad():
        out = attn_mod.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
    assert (out - seen["out"]).abs().max() < 1e-5


def test_swin_attention_is_not_supported() -> None:
    with pytest.raises(NotImplementedError):
        _swin().last_block_attention(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_intermediate_layers(kind: str) -> None:
    backbone = _vit() if kind == "vit" else _swin()
    res = 32 if kind == "vit" else 64
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        layers = backbone.get_intermediate_layers(x, n=2)
        raw = backbone.get_intermediate_layers(x, n=1, norm=False)
        final = backbone.forward_features(x)
    assert len(layers) == 2 and all(t.shape == final.shape for t in layers)
    assert (layers[-1] - final).abs().max() < 1e-6
    assert not torch.allclose(raw[0], final)
    with pytest.raises(ValueError, match="n must be"):
        backbone.get_intermediate_layers(x, n=3)


def test_bf16_autocast_and_grad_checkpointing() -> None:
    backbone = _vit().train()
    backbone.set_grad_checkpointing(True)
    mask = _random_mask(2, (8, 8))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = backbone(torch.randn(2, 3, 32, 32), mask)
        attn = backbone.last_block_attention(torch.randn(2, 3, 32, 32), mask)
    out["patch"].float().square().mean().backward()
    assert torch.isfinite(out["cls"].float()).all()
    assert attn.dtype == torch.float32 and torch.allclose(attn.sum(-1), torch.ones(2, 2, 65), atol=1e-3)
    assert backbone.mask_token.grad is not None and torch.isfinite(backbone.mask_token.grad).all()


def test_no_weight_decay_keys_name_real_parameters() -> None:
    for backbone in (_vit(reg_tokens=1), _swin()):
        names = dict(backbone.named_parameters())
        keys = backbone.no_weight_decay_keys()
        assert "mask_token" in keys and keys <= set(names)
    expected = {"model.pos_embed", "model.cls_token", "model.reg_token"}
    assert expected <= _vit(reg_tokens=1).no_weight_decay_keys()


def test_wrong_model_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="VisionTransformer"):
        Backbone(torch.nn.Linear(2, 2), kind="vit")
    with pytest.raises(ValueError, match="kind"):
        Backbone(_vit().model, kind="cnn")  # type: ignore[arg-type]
