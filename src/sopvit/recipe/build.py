"""The composition root: the model and the objective a pre-training config describes."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from sopvit.methods import Objective
from sopvit.models.build import build_student_teacher
from sopvit.models.student_teacher import StudentTeacher
from sopvit.recipe.config import PretrainConfig


def head_width(cfg: PretrainConfig) -> int:
    """Width of the head outputs the objective sees: the prototype count when the head ends in learnable
    prototypes, else ``model.head_bottleneck_dim``."""
    head = cfg.spec.head(cfg.method_config)
    return cfg.model.head_bottleneck_dim if head is None else head.count


def build_model(cfg: PretrainConfig) -> StudentTeacher:
    """Student and teacher encoders for ``cfg.model`` at the global crop size of ``cfg.data``, with the
    head the method asks for."""
    head = cfg.spec.head(cfg.method_config)
    return build_student_teacher(
        cfg.model,
        cfg.data.global_size,
        cfg.data.in_chans,
        head_prototypes=None if head is None else head.count,
        norm_last_layer=True if head is None else head.norm_last_layer,
    )


def build_objective(cfg: PretrainConfig, device: torch.device | str = "cpu") -> Objective:
    """The objective of ``cfg.method``, configured by its section, on ``device``."""
    objective = cfg.spec.build(cfg.method_config, head_width(cfg))
    if not isinstance(objective, nn.Module):
        raise TypeError(f"method {cfg.method!r} built a {type(objective).__name__}, not an nn.Module")
    return cast(Objective, objective.to(device))
