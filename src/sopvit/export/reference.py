"""Load the backbone of a SOP/iBOT/DINO reference checkpoint, and fit foreign state dicts to timm models.

Reference checkpoints come from other code bases: their weights hide under wrappers (``teacher``,
``state_dict``, DDP's ``module.``) and their architecture is only implied, so they get their own reader
that names every key that does not fit instead of timm's multi-line ``load_state_dict`` error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sopvit.checkpoints.safe_load import load_torch, read_or_explain
from sopvit.models import Backbone, create_backbone

# Wrappers and prefixes used by the SOP/iBOT/DINO reference code (DDP, torch.compile, MultiCropWrapper).
_WRAPPER_KEYS = ("teacher", "state_dict", "model", "student")
_PREFIXES = ("module.", "_orig_mod.", "teacher.", "student.", "backbone.", "encoder.")
_MASK_KEYS = ("masked_embed", "mask_token")
_TIMM_HINT = "expected timm ViT/Swin keys like 'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight'"


def _require(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _unwrap(obj: Any, where: str) -> dict[str, Tensor]:
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{where}: found no state dict (looked under {', '.join(_WRAPPER_KEYS)})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _list(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "") if keys else "none"


def load_strict(model: nn.Module, weights: Mapping[str, Tensor], where: str | Path, what: str) -> None:
    """Load ``weights`` into ``model`` with ``strict=True``, or raise a one-line ``ValueError`` listing
    the missing and unexpected keys and the shapes that differ (``what`` names the model)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad = [
        f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or bad:
        raise ValueError(
            f"{where} does not fit {what}: missing keys: {_list(missing)}; unexpected keys: "
            f"{_list(unexpected)}; shapes that differ: {_list(bad)}"
        )
    model.load_state_dict(dict(weights), strict=True)


def load_reference_checkpoint(
    path: str | Path | Mapping[str, Any], arch: str, **backbone_kwargs: Any
) -> Backbone:
    """A :class:`Backbone` of ``arch`` holding the weights of a SOP/iBOT/DINO reference checkpoint.

    Args:
        path: checkpoint file (or the already loaded dict); it may wrap the weights under
            ``teacher``/``student``/``state_dict``/``model`` and prefix keys with ``module.``,
            ``backbone.``, ``teacher.backbone.`` ...; the teacher is preferred when both are present.
        arch: our architecture name (see ``sopvit.models.describe_archs``).
        **backbone_kwargs: passed to :func:`sopvit.models.create_backbone` (``img_size``, ``in_chans`` ...).

    Raises:
        ValueError: the keys or shapes do not fit ``arch``; lists up to 10 missing and unexpected keys.
        UnsafeFileError: (a ``ValueError``) the file asks for a type that could run code when loaded.
    """
    where = "the given dict" if isinstance(path, Mapping) else str(path)
    if isinstance(path, Mapping):
        raw: Any = path
    else:
        file = _require(path)
        # Reference checkpoints are downloaded: their argparse Namespace, numpy scalars and optimizer
        # state are allowlisted, anything that could run code is refused.
        raw = read_or_explain(load_torch, file, f"{file} is not a readable checkpoint")
    weights: dict[str, Tensor] = {}
    mask: Tensor | None = None
    for key, value in _unwrap(raw, where).items():
        key = _strip(key)
        if key in _MASK_KEYS:
            mask = value
        elif not key.startswith("head."):  # the projection head is not part of the backbone
            weights[key] = value
    backbone = create_backbone(arch, **{**_geometry(weights), **backbone_kwargs})
    expected = backbone.model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not fit arch {arch!r} ({_TIMM_HINT}); missing keys: {_list(missing)}; "
            f"unexpected keys: {_list(unexpected)}"
        )
    bad = [
        f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if weights[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{where} has shapes that do not fit arch {arch!r}: {_list(bad)}")
    backbone.model.load_state_dict(weights, strict=True)
    if mask is not None:
        if mask.numel() != backbone.mask_token.numel():
            raise ValueError(f"{where}: mask token has {mask.numel()} values, expected {backbone.embed_dim}")
        with torch.no_grad():
            backbone.mask_token.copy_(mask.reshape(backbone.mask_token.shape))
    return backbone.eval()


def _geometry(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """``in_chans`` and ``img_size`` a ViT state dict was trained with, read off its patch and position
    embeddings (a 1-channel 28 px model and a 224 px RGB one share every other shape); {} when absent."""
    proj = weights.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return {}
    out = {"in_chans": int(proj.shape[1])}
    pos = weights.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        for prefix in (1, 0):  # [CLS] + patches, or patches only (no_embed_class)
            grid = math.isqrt(pos.shape[1] - prefix)
            if grid > 0 and grid * grid == pos.shape[1] - prefix:
                out["img_size"] = grid * int(proj.shape[-1])
                break
    return out
