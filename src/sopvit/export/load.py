"""Load a teacher backbone from a training run or any export of it, old or new.

Exports outlive the code that wrote them, so every layout sopvit ever wrote stays readable here: folders
in timm's Hub layout (:mod:`sopvit.export.hf`, also timm's own ``save_for_hf`` folders), the format 1
folders with sopvit's own ``config.json``, and ``timm`` ``.pth`` files beside their ``timm_args.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import timm
from torch import Tensor

from sopvit.checkpoints.checkpoint import LATEST, CheckpointError
from sopvit.checkpoints.run_dir import checkpoint_path, is_run_dir, looks_sharded, read_checkpoint
from sopvit.checkpoints.safe_load import UnsafeFileError, load_torch, read_or_explain
from sopvit.checkpoints.sharded import POINTER
from sopvit.config import ConfigError, apply_overrides
from sopvit.config.coerce import merge
from sopvit.export.hf import CONFIG_JSON, TORCH_WEIGHTS, WEIGHTS, is_hub_config, load_hub_folder
from sopvit.export.reference import load_strict
from sopvit.models import Backbone, Encoder
from sopvit.recipe.build import build_model
from sopvit.recipe.config import PretrainConfig, pretrain_config_type, upgrade_saved

TIMM_ARGS = "timm_args.json"


def _require(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
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
    """``(checkpoint dict, its PretrainConfig, checkpoint path)`` of a run directory, a checkpoint file or
    a sharded checkpoint directory (gathered here into whole tensors).

    Raises:
        FileNotFoundError: ``source`` is missing, or a directory without a checkpoint.
        CheckpointError: the run's ``checkpoint.latest`` names a missing or incomplete directory, or
            ``source`` is an incomplete sharded directory.
        ValueError: the checkpoint is unreadable or not a training checkpoint (:class:`UnsafeFileError`
            when it asks for a type that could run code).
    """
    path = checkpoint_path(source)
    try:
        state = read_checkpoint(path)
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
    """Teacher backbone + projection head, in eval mode and trainable, of a run directory, its
    ``checkpoint.pt`` or its sharded ``checkpoint-NNNNNN`` directory.

    Only a training checkpoint holds the head with its architecture; exports and bare state dicts are
    refused with a one-line ``ValueError`` naming ``needed_by`` and what to pass instead. A run that cannot
    be read raises what :func:`read_run` raises.
    """
    path = _require(path)
    folder = path if path.is_dir() else path.parent
    hint = (
        f"{needed_by} needs the teacher's projection head; pass the run directory (or its {LATEST} or "
        "checkpoint-NNNNNN directory)"
    )
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
        if is_run_dir(path) or looks_sharded(path):
            raise  # a run that cannot be read: the error says what is wrong with it
        if path.is_dir():
            raise ValueError(f"{err}: {hint}") from err
        raise ValueError(
            f"{path} is not a sopvit training checkpoint (an export or a bare state dict has no "
            f"projection head): {hint}"
        ) from err
    return teacher_encoder(state, cfg).requires_grad_(True)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it records the architecture needed to rebuild the model")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _format1(data: Mapping[str, Any], where: Path) -> Mapping[str, Any]:
    """The metadata of a ``timm_args.json`` or of a format 1 folder's ``config.json``."""
    for key in ("timm_name", "timm_kwargs", "kind"):
        if key not in data:
            raise ValueError(
                f"{where} has no '{key}' entry: neither a sopvit export nor a timm Hub config "
                "(no 'pretrained_cfg')"
            )
    return data


def _backbone_from(meta: Mapping[str, Any], weights: Mapping[str, Tensor], where: Path) -> Backbone:
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    # Format 1 folders carry the projection head under "head."; the timm model itself has no head.
    body = {k: v for k, v in weights.items() if not k.startswith("head.")}
    load_strict(model, body, where, f"timm {meta['timm_name']} {meta['timm_kwargs']}")
    backbone = Backbone(model, meta["kind"], meta.get("arch"), meta["timm_name"], meta["timm_kwargs"])
    return backbone.eval()


def load_pretrained(path: str | Path) -> Backbone:
    """Teacher backbone, in eval mode and trainable (``requires_grad``, ready to fine-tune), from any of:

    - a run directory, its ``checkpoint.pt`` or its sharded ``checkpoint-NNNNNN`` directory (FSDP runs,
      gathered here into whole tensors);
    - an exported ``hf``/``safetensors`` folder, or its ``model.safetensors``: timm's Hub layout (written
      since format 2, or by timm's ``save_for_hf`` for a ViT or Swin) or sopvit's format 1;
    - a ``timm`` ``.pth`` export with its ``timm_args.json`` next to it.

    Folders of format 2 restore the trained mask token; the other exports do not carry it (inference never
    uses it), so it is freshly initialised there.
    """
    # The teacher is frozen during pre-training; a loaded backbone must not inherit that.
    return _load(path).requires_grad_(True)


def _load(path: str | Path) -> Backbone:
    path = _require(path)
    folder = path if path.is_dir() else path.parent
    if is_run_dir(path) or looks_sharded(path):  # read_run says what an incomplete one lacks
        state, cfg, _ = read_run(path)
        return teacher_encoder(state, cfg).backbone
    weights_in_folder = (folder / WEIGHTS).is_file() or (folder / TORCH_WEIGHTS).is_file()
    if (path.is_dir() and weights_in_folder) or path.suffix == ".safetensors":
        data = _read_json(folder / CONFIG_JSON)
        if is_hub_config(data):
            return load_hub_folder(folder, data)
        from safetensors.torch import load_file

        weights_file = path / WEIGHTS if path.is_dir() else path
        meta = _format1(data, folder / CONFIG_JSON)
        return _backbone_from(meta, load_file(str(weights_file)), weights_file)
    if path.is_file() and path.name != LATEST and (folder / TIMM_ARGS).is_file() and path.suffix == ".pth":
        meta = _format1(_read_json(folder / TIMM_ARGS), folder / TIMM_ARGS)
        weights = read_or_explain(load_torch, path, f"{path} is not a readable timm state dict")
        if isinstance(weights, dict) and "format_version" not in weights:
            return _backbone_from(meta, weights, path)
    if path.is_file():
        state, cfg, _ = read_run(path)
        return teacher_encoder(state, cfg).backbone
    raise ValueError(
        f"{path} is not a sopvit run directory (no {LATEST} or {POINTER}), nor a sharded checkpoint "
        f"directory, an exported folder ({CONFIG_JSON} + {WEIGHTS}) or a timm .pth next to its {TIMM_ARGS}"
    )
