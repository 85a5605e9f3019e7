"""torch.hub entry points: ``torch.hub.load(repo, "sop_vit_small", source="local", weights=path)``.

``weights`` is a local path accepted by :func:`sopvit.export.load_pretrained` (run directory, checkpoint,
exported hf/safetensors folder or timm ``.pth``); without it the un-trained architecture is built.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

dependencies = ["torch", "timm"]

# torch.hub imports this file from the repository root; a clone that was never pip-installed still has
# its package under src/, and putting that first keeps the code in step with this hubconf.
_SRC = Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from sopvit.export import load_pretrained  # noqa: E402
from sopvit.models import Backbone, create_backbone  # noqa: E402


def _load(arch: str, kind: str, embed_dim: int, weights: str | None, **kwargs: Any) -> Backbone:
    if weights is None:
        return create_backbone(arch, **kwargs).eval()
    if kwargs:
        raise ValueError(
            f"extra arguments {sorted(kwargs)} only apply without weights (got weights={weights})"
        )
    backbone = load_pretrained(weights)
    # Refuse a mismatch here: otherwise "sop_vit_small" could silently return a ViT-B.
    if backbone.kind != kind or backbone.embed_dim != embed_dim:
        raise ValueError(
            f"{weights} holds a {backbone.kind} with width {backbone.embed_dim} ({backbone.arch}); "
            f"this entry point is {arch} ({kind}, width {embed_dim})"
        )
    return backbone


def sop_vit_small(weights: str | None = None, **kwargs: Any) -> Backbone:
    """SOP ViT-S/16 (D=384); ``kwargs`` (e.g. ``img_size``, ``in_chans``) shape an un-trained model."""
    return _load("vit_small_patch16_224", "vit", 384, weights, **kwargs)


def sop_vit_base(weights: str | None = None, **kwargs: Any) -> Backbone:
    """SOP ViT-B/16 (D=768); ``kwargs`` (e.g. ``img_size``, ``in_chans``) shape an un-trained model."""
    return _load("vit_base_patch16_224", "vit", 768, weights, **kwargs)


def sop_vit_large(weights: str | None = None, **kwargs: Any) -> Backbone:
    """SOP ViT-L/16 (D=1024); ``kwargs`` (e.g. ``img_size``, ``in_chans``) shape an un-trained model."""
    return _load("vit_large_patch16_224", "vit", 1024, weights, **kwargs)


def sop_swin_tiny(weights: str | None = None, **kwargs: Any) -> Backbone:
    """SOP Swin-T, window 7 (D=768); ``kwargs`` (e.g. ``img_size``) shape an un-trained model."""
    return _load("swin_tiny_patch4_window7_224", "swin", 768, weights, **kwargs)
