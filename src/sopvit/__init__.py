"""sopvit: Self-Organizing Visual Prototypes (ICML 2025) for self-supervised vision transformers."""

from sopvit.models import Backbone
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


def load_pretrained(path: str) -> Backbone:
    """A pre-trained SOP backbone from a run, a checkpoint, or a timm / safetensors / Hugging Face export."""
    from sopvit.export import load_pretrained as load

    return load(path)


__all__ = [
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
