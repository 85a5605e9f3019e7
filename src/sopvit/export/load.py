"""Load a teacher backbone from a training run, one of our exports, or a SOP/iBOT reference checkpoint."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import Tensor

from sopvit.checkpoints.checkpoint import LATEST, CheckpointError, load_checkpoint
from sopvit.checkpoints.safe_load import UnsafeFileError, load_torch, read_or_explain
from sopvit.config import ConfigError, apply_overrides
from sopvit.config.coerce import merge
from sopvit.models import Backbone, Encoder, create_backbone
from sopvit.recipe.build import build_model
from sopvit.recipe.config import PretrainConfig, pretrain_config_type, upgrade_saved

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
TIMM_ARGS = "timm_args.json"

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


def checkpoint_path(source: str | Path) -> Path:
    """The checkpoint file of a run directory (``<dir>/checkpoint.pt``) or ``source`` itself."""
    path = _require(source)
    if path.is_dir():
        path = path / LATEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{source} is a directory without a {LATEST} (not a sopvit run directory)"
            )
    return path


def config_from_dict(values: Mapping[str, Any], where: Path) -> PretrainConfig:
    """Rebuild the typed config that a checkpoint stores as a plain dict (``config_to_dict``)."""
    try:
        return cast(
            PretrainConfig,
            apply_overrides(merge(pretrain_config_type(), None, upgrade_saved(values), ""), []),
        )
    except ConfigError as err:
        raise ValueError(f"{where}: the saved training config is invalid for this sopvit ({err})") from err


def read_run(source: str | Path) -> tuple[dict[str, Any], PretrainConfig, Path]:
    """``(checkpoint dict, its PretrainConfig, checkpoint path)`` of a run directory or checkpoint file."""
    path = checkpoint_path(source)
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"{path} is not a readable sopvit checkpoint: {err}") from err
    missing = [k for k in ("teacher", "config") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a sopvit training checkpoint (no {', '.join(missing)} entry)")
    return state, config_from_dict(state["config"], path), path


def teacher_encoder(state: Mapping[str, Any], cfg: PretrainConfig) -> Encoder:
    """The EMA teacher (backbone + head) of a training checkpoint, in eval mode."""
    teacher = build_model(cfg).teacher
    teacher.load_state_dict(state["teacher"], strict=True)
    return teacher.eval()


def load_teacher_encoder(path: str | Path, needed_by: str = "this evaluation") -> Encoder:
    """Teacher backbone + projection head, in eval mode and trainable, of a run directory or its checkpoint.

    Only a training checkpoint holds the head with its architecture; exports and bare state dicts are
    refused with a one-line ``ValueError`` naming ``needed_by`` and what to pass instead.
    """
    path = _require(path)
    folder = path if path.is_dir() else path.parent
    hint = f"{needed_by} needs the teacher's projection head; pass the run directory (or its {LATEST})"
    export = (
        (path.is_dir() and (path / WEIGHTS).is_file())
        or path.suffix == ".safetensors"
        or (path.is_file() and path.suffix == ".pth" and (folder / TIMM_ARGS).is_file())
    )
    if export:
        raise ValueError(f"{path} is an export, which has no projection head: {hint}")
    try:
        state, cfg, _ = read_run(path)
    except UnsafeFileError:
        raise  # its message names the dangerous type
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{path} is not a sopvit training checkpoint (an export or a bare state dict has no "
            f"projection head): {hint}"
        ) from err
    return teacher_encoder(state, cfg).requires_grad_(True)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it records the architecture needed to rebuild the model")
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("timm_name", "timm_kwargs", "kind"):
        if key not in data:
            raise ValueError(f"{path} has no '{key}' entry; was it written by sopvit.export?")
    return cast(dict[str, Any], data)


def _backbone_from(meta: Mapping[str, Any], weights: Mapping[str, Tensor], where: Path) -> Backbone:
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    # Exports may carry the projection head under "head."; the timm model itself has no head parameters.
    body = {k: v for k, v in weights.items() if not k.startswith("head.")}
    try:
        model.load_state_dict(body, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where} does not match {meta['timm_name']} {meta['timm_kwargs']}: {err}") from err
    backbone = Backbone(model, meta["kind"], meta.get("arch"), meta["timm_name"], meta["timm_kwargs"])
    return backbone.eval()


def load_pretrained(path: str | Path) -> Backbone:
    """Teacher backbone, in eval mode and trainable (``requires_grad``, ready to fine-tune), from any of:

    - a run directory or its ``checkpoint.pt``;
    - an exported ``hf``/``safetensors`` folder (``config.json`` + ``model.safetensors``), or that file;
    - a ``timm`` ``.pth`` export with its ``timm_args.json`` next to it.

    Exports do not carry the mask token (inference never uses it), so it is freshly initialised there.
    """
    # The teacher is frozen during pre-training; a loaded backbone must not inherit that.
    return _load(path).requires_grad_(True)


def _load(path: str | Path) -> Backbone:
    path = _require(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / LATEST).is_file():
        state, cfg, _ = read_run(path)
        return teacher_encoder(state, cfg).backbone
    if (path.is_dir() and (path / WEIGHTS).is_file()) or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights_file = path / WEIGHTS if path.is_dir() else path
        return _backbone_from(_read_json(folder / CONFIG_JSON), load_file(str(weights_file)), weights_file)
    if path.is_file() and path.name != LATEST and (folder / TIMM_ARGS).is_file() and path.suffix == ".pth":
        meta = _read_json(folder / TIMM_ARGS)
        weights = read_or_explain(load_torch, path, f"{path} is not a readable timm state dict")
        if isinstance(weights, dict) and "format_version" not in weights:
            return _backbone_from(meta, weights, path)
    if path.is_file():
        state, cfg, _ = read_run(path)
        return teacher_encoder(state, cfg).backbone
    raise ValueError(
        f"{path} is neither a sopvit run directory ({LATEST}) nor an exported folder "
        f"({CONFIG_JSON} + {WEIGHTS}) nor a timm .pth next to its {TIMM_ARGS}"
    )


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
