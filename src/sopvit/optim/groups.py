"""Parameter groups (the one no-decay rule, layer decay), the pre-training optimizer and DINO-style
per-parameter gradient clipping."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sopvit.distributed import local_shard, shard_group

# timm's parameter-group rules (1-D parameters and a model's own list never decayed) serve pre-training
# here, fine-tuning's layer-wise lr decay (eval/finetune_model.py) and semi-supervised fine-tuning.
try:
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
except ImportError:  # older timm (1.0.9, which pyproject allows) has them only in optim_factory
    from timm.optim.optim_factory import param_groups_layer_decay, param_groups_weight_decay

__all__ = [
    "build_optimizer",
    "clip_per_parameter",
    "param_groups",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
    "set_schedule",
]


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups, always in this order: decayed weights, then parameters never decayed.

    The rule is the reference code's (DINO/iBOT/SOP ``utils.get_params_groups``): every trainable
    parameter is decayed except biases and 1-D parameters (norm weights). The [CLS] token, position
    embedding and mask token are decayed, as there. timm's ``param_groups_weight_decay`` applies the
    rule (it also spares 0-d parameters, which sopvit's models do not have); its group order (no-decay
    first) is rearranged here so that the order, which a saved optimizer state depends on, stays fixed.
    The groups carry ``apply_wd`` so the weight-decay schedule (:func:`set_schedule`) touches only the
    first.
    """
    # Any weight decay > 0 asks timm to split; the value itself is replaced by the schedule every step.
    split = {g["weight_decay"] > 0: g["params"] for g in param_groups_weight_decay(model, weight_decay=1.0)}
    return [
        {"params": split.get(True, []), "apply_wd": True},
        {"params": split.get(False, []), "apply_wd": False, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused kernel on CUDA); lr and weight decay are set every step by the schedules."""
    return torch.optim.AdamW(param_groups(model), lr=0.0, betas=(0.9, 0.999), fused=device.type == "cuda")


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_per_parameter(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm on its own (DINO/iBOT), not the global norm.

    Sharded gradients (FSDP) are clipped by their whole norm: the squared norms of the local shards are
    summed over ranks in one all-reduce.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    group = shard_group(grads)
    local = [local_shard(g) for g in grads]
    if group is None:
        norms = list(torch._foreach_norm(local))
    else:
        squares = torch.stack(torch._foreach_norm(local)).square()
        dist.all_reduce(squares, group=group)
        norms = list(squares.sqrt().unbind())
    scales = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(local, scales)
