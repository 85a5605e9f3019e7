"""The model side of fine-tuning: a [CLS] classifier, layer-wise lr decay groups, stochastic depth."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from sopvit.models import Backbone


class Classifier(nn.Module):
    """Backbone + linear head on the final-normed [CLS]."""

    def __init__(self, backbone: Backbone, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, n_classes)
        # tiny init (MAE/BEiT): the randomly initialised head barely perturbs the pre-trained features
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)["cls"])


def vit_blocks(backbone: Backbone) -> list[nn.Module]:
    blocks = getattr(backbone.model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"backbone: expected a timm ViT with .blocks, got {type(backbone.model).__name__}")
    return list(blocks)


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings/tokens, i + 1 for ``blocks.i``, depth + 1 for the final norm and the head."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if parts[-1] in ("cls_token", "pos_embed", "reg_token", "mask_token") or "patch_embed" in parts:
        return 0
    return depth + 1


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups keyed by (layer, decay?); each carries ``lr_scale = layer_decay ** (depth + 1 - id)``."""
    depth = len(vit_blocks(model.backbone))
    no_wd = {f"backbone.{k}" for k in model.backbone.no_weight_decay_keys()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        decay = p.ndim > 1 and name not in no_wd  # biases and norm scales are 1-D
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - lid),
            },
        )
        group["params"].append(p)
    return list(groups.values())


def set_drop_path(backbone: Backbone, rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last); returns the rates."""
    blocks = vit_blocks(backbone)
    rates = torch.linspace(0, rate, len(blocks)).tolist() if len(blocks) > 1 else [rate]
    for block, r in zip(blocks, rates, strict=True):
        for attr in ("drop_path1", "drop_path2"):
            module = getattr(block, attr, None)
            if isinstance(module, DropPath):
                module.drop_prob = r
            elif module is not None and r > 0:
                # timm builds nn.Identity for rate 0; swapping it is equivalent to a rebuild
                setattr(block, attr, DropPath(r))
    return rates
