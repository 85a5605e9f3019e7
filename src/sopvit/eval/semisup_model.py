"""The model side of ``semisup``: the kept projection-head layers, the classifier, the AdamW groups."""

from __future__ import annotations

import copy
from typing import Any, cast

from torch import Tensor, nn

from sopvit.models import Encoder, ProjectionHead
from sopvit.optim.groups import param_groups_weight_decay


class HeadLayers(nn.Module):
    """The first layers of a :class:`ProjectionHead`, under the head's own names (``mlp.0``, ``mlp.1``...)."""

    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.mlp(x))


def keep_head_layers(head: ProjectionHead, n: int) -> tuple[nn.Module, int]:
    """A copy of the first ``n`` Linear layers of ``head``, each with the GELU after it, and their width.

    ``n`` = 0 keeps nothing (the classifier reads the backbone's [CLS]); all of the head's layers keep it
    whole, L2 normalisation included (iBOT then adds its prototype layer, which SOP's head does not have).
    """
    linears = [i for i, m in enumerate(head.mlp) if isinstance(m, nn.Linear)]
    if not 0 <= n <= len(linears):
        raise ValueError(f"head_layers: the checkpoint's projection head has {len(linears)} layers, got {n}")
    if n == 0:
        return nn.Identity(), head.in_dim
    if n == len(linears):
        return copy.deepcopy(head), head.out_dim
    kept = copy.deepcopy(head.mlp[: linears[n]])  # up to the activation after the n-th Linear
    return HeadLayers(cast(nn.Sequential, kept)), cast(nn.Linear, head.mlp[linears[n - 1]]).out_features


class SemisupClassifier(nn.Module):
    """Backbone + kept head layers on the final-normed [CLS] + a new linear classifier, all trainable.

    Holds copies: training never touches the encoder it was built from.
    """

    def __init__(self, encoder: Encoder, head_layers: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(encoder.backbone)
        self.head, width = keep_head_layers(encoder.head, head_layers)
        self.classifier = nn.Linear(width, n_classes)
        # as the reference's model._init_weights: truncated normal, std 0.02, zero bias
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.requires_grad_(True)  # a pre-training teacher arrives frozen
        self.backbone.mask_token.requires_grad_(False)  # masked modelling only: DDP must not wait for it

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.classifier(self.head(self.backbone(x)["cls"])))


def param_groups(model: SemisupClassifier, weight_decay: float) -> list[dict[str, Any]]:
    """The AdamW groups of the reference's timm ``create_optimizer``, decayed first: timm's rule (decay on
    every trainable tensor but biases and 1-D norm weights), as pre-training applies it. iBOT's
    VisionTransformer names no ``no_weight_decay`` exceptions, so the [CLS] token and the position
    embedding are decayed. No layer-wise lr decay (``--layer_decay`` default 1.0, not passed)."""
    no_decay, decay = param_groups_weight_decay(model, weight_decay)
    return [g for g in (decay, no_decay) if g["params"]]
