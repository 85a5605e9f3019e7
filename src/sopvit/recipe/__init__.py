"""The composition root of pre-training: the config schema made of every package's section, and the model
and objective it describes."""

from sopvit.recipe.build import build_model, build_objective, head_width
from sopvit.recipe.config import (
    PretrainConfig,
    RunConfig,
    TrainConfig,
    load_pretrain_config,
    pretrain_config_type,
    upgrade_saved,
)

__all__ = [
    "PretrainConfig",
    "RunConfig",
    "TrainConfig",
    "build_model",
    "build_objective",
    "head_width",
    "load_pretrain_config",
    "pretrain_config_type",
    "upgrade_saved",
]
