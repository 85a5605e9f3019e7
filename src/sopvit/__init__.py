"""sopvit: Self-Organizing Visual Prototypes (ICML 2025) for self-supervised vision transformers."""

from sopvit.sop import (
    MemoryBank,
    SOPConfig,
    SOPObjective,
    assign,
    build_prototypes,
    cross_view_loss,
    masked_patch_loss,
)

__version__ = "0.1.0"

__all__ = [
    "MemoryBank",
    "SOPConfig",
    "SOPObjective",
    "__version__",
    "assign",
    "build_prototypes",
    "cross_view_loss",
    "masked_patch_loss",
]
