"""Optimizer construction and DINO-style per-parameter gradient clipping."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: weights (decayed) and biases / norms / tokens (never decayed).

    The groups carry ``apply_wd`` so the weight-decay schedule touches only the first.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
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
    """Scale each parameter's gradient to norm <= max_norm on its own (DINO/iBOT), not the global norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scales = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
