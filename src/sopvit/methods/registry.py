"""``method: sop | ibot | dino`` -> the objective the training loop runs."""

from __future__ import annotations

import torch

from sopvit.baselines.objectives import DINOObjective, IBOTObjective
from sopvit.config.pretrain import PretrainConfig
from sopvit.methods.interface import Objective
from sopvit.sop import SOPObjective


def build_objective(cfg: PretrainConfig, device: torch.device | str = "cpu") -> Objective:
    """The objective of ``cfg.method``, configured by its section, on ``device``."""
    objective: SOPObjective | DINOObjective
    if cfg.method == "ibot":
        objective = IBOTObjective(cfg.ibot)
    elif cfg.method == "dino":
        objective = DINOObjective(cfg.dino)
    else:
        objective = SOPObjective(cfg.sop)
    return objective.to(device)
