"""The SOP method as pure tensor functions and one module: memories, prototypes, losses, objective."""

from sopvit.methods.sop.config import SOPConfig
from sopvit.methods.sop.losses import assign, cross_view_loss, masked_patch_loss, masked_token_loss
from sopvit.methods.sop.memory_bank import MemoryBank
from sopvit.methods.sop.objective import SOPObjective
from sopvit.methods.sop.prototypes import Prototypes, build_prototype_tasks, build_prototypes

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
