"""sopvit: Self-Organizing Visual Prototypes (ICML 2025) for self-supervised vision transformers.

Nothing is imported eagerly: ``import sopvit.models`` loads the backbones and nothing of training. The
names below resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Backbone": "sopvit.models",
    "MemoryBank": "sopvit.methods.sop",
    "SOPConfig": "sopvit.methods.sop",
    "SOPObjective": "sopvit.methods.sop",
    "assign": "sopvit.methods.sop",
    "build_prototypes": "sopvit.methods.sop",
    "cross_view_loss": "sopvit.methods.sop",
    "masked_patch_loss": "sopvit.methods.sop",
}

if TYPE_CHECKING:
    from sopvit.methods.sop import (
        MemoryBank,
        SOPConfig,
        SOPObjective,
        assign,
        build_prototypes,
        cross_view_loss,
        masked_patch_loss,
    )
    from sopvit.models import Backbone


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sopvit' has no attribute {name!r}")


def load_pretrained(path: str) -> Backbone:
    """A pre-trained SOP backbone from a run, a checkpoint, or a timm / safetensors / Hugging Face export."""
    from sopvit.export import load_pretrained as load

    return load(path)


__all__ = [
    "Backbone",
    "MemoryBank",
    "SOPConfig",
    "SOPObjective",
    "__version__",
    "assign",
    "build_prototypes",
    "cross_view_loss",
    "load_pretrained",
    "masked_patch_loss",
]
