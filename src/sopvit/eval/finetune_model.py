"""The model side of fine-tuning: a [CLS] classifier, layer-wise lr decay groups, stochastic depth."""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from sopvit.models import Backbone
from sopvit.optim.groups import param_groups_layer_decay


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

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """BEiT's layers (``get_num_layer_for_vit``) as timm groups: the patch embedding and the tokens
        first, then block i; the rest (final norm, head) matches nothing, which timm puts in a last
        layer of its own. (timm's own ViT matcher would fold the final norm into the last block.)"""
        vit_blocks(self.backbone)  # a clear error for backbones without transformer blocks
        m = re.escape("backbone.model.")
        return {
            "stem": rf"^(?:backbone\.mask_token|{m}(?:cls_token|reg_token|pos_embed|patch_embed))",
            "blocks": [(rf"^{m}blocks\.(\d+)", None)],
        }


def vit_blocks(backbone: Backbone) -> list[nn.Module]:
    blocks = getattr(backbone.model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"backbone: expected a timm ViT with .blocks, got {type(backbone.model).__name__}")
    return list(blocks)


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """BEiT's AdamW groups, by timm's ``param_groups_layer_decay``: ``lr_scale = layer_decay ** (depth + 1
    - id)`` with id 0 for the patch embedding and tokens, i + 1 for block i, depth + 1 for the final norm and
    the head; no weight decay on 1-D parameters nor on the backbone's no-decay keys ([CLS] and position
    embeddings, BEiT's ``no_weight_decay``)."""
    no_wd = [f"backbone.{k}" for k in model.backbone.no_weight_decay_keys()]
    groups: list[dict[str, Any]] = param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=no_wd, layer_decay=layer_decay
    )
    return groups


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
