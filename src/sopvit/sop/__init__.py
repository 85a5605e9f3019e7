"""The SOP method as pure tensor functions and one module: memories, prototypes, losses, objective."""

from sopvit.sop.losses import assign, cross_view_loss, masked_patch_loss, masked_token_loss
from sopvit.sop.memory_bank import MemoryBank
from sopvit.sop.objective import SOPConfig, SOPObjective
from sopvit.sop.prototypes import Prototypes, build_prototype_tasks, build_prototypes

__all__ = [
    "MemoryBank",
    "Prototypes",
    "SOPConfig",
    "SOPObjective",
    "assign",
    "build_prototype_tasks",
    "build_prototypes",
    "cross_view_loss",
    "masked_patch_loss",
    "masked_token_loss",
]
