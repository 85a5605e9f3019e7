"""The exported folder in timm's Hugging Face Hub layout, so timm and transformers load it without sopvit.

``timm.create_model("local-dir:DIR" | "hf-hub:USER/REPO", pretrained=True)`` and transformers'
``TimmWrapperModel`` rebuild the network from ``config.json``'s ``architecture`` + ``model_args`` and load
``model.safetensors`` strictly under timm's own keys. What only sopvit needs rides beside that, where both
libraries look away: the ``"sopvit"`` entry of ``config.json`` (architecture name, training step, recipe)
and ``sopvit.safetensors`` (the trained mask token, the projection head when asked for). The mask token
cannot go into ``model.safetensors``: strict loading would refuse it, and timm's ViT loader takes any state
dict holding a ``mask_token`` for a DINOv2 checkpoint and rewrites it.

Reading goes both ways: folders written here, and timm's own ``save_for_hf`` / ``push_to_hf_hub`` folders
of a ViT or Swin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sopvit.checkpoints.safe_load import load_torch, read_or_explain
from sopvit.export.reference import load_strict
from sopvit.models import Backbone

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
EXTRAS = "sopvit.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
FOLDER_VERSION = 2  # 1: sopvit's own config.json, no mask token (still read by sopvit.export.load)
# sopvit's evaluation transform resizes the shorter side to size * 256 / 224, then centre-crops.
CROP_PCT = 224 / 256
# Training settings, not architecture; and transformers passes num_classes=0 itself, so a second one in
# model_args is a TypeError there (timm takes the class count from the top-level num_classes instead).
_NOT_MODEL_ARGS = ("pretrained", "num_classes", "drop_path_rate", "drop_rate")
_KINDS = {"timm.models.vision_transformer": "vit", "timm.models.swin_transformer": "swin"}


def _copies(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage, and callers may keep training the model.
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def model_args(backbone: Backbone) -> dict[str, Any]:
    """timm constructor arguments that, on top of ``backbone.timm_name``'s defaults, rebuild its shapes."""
    args = {k: v for k, v in backbone.timm_kwargs.items() if k not in _NOT_MODEL_ARGS}
    model: Any = backbone.model
    if backbone.kind == "vit":
        # Spelled out so a change of the registry defaults of timm_name cannot change the rebuilt net.
        args |= {
            "class_token": bool(model.has_class_token),
            "reg_tokens": int(model.num_reg_tokens),
            "global_pool": str(model.global_pool),
        }
    return args


def hub_config(
    backbone: Backbone, image_size: int, mean: list[float], std: list[float], sopvit: dict[str, Any]
) -> dict[str, Any]:
    """``config.json`` in the layout timm's ``save_for_hf`` writes, with ``sopvit``'s metadata beside it."""
    embed: Any = backbone.model.patch_embed
    in_chans = int(embed.proj.in_channels)
    return {
        "architecture": backbone.timm_name,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "model_args": model_args(backbone),
        "pretrained_cfg": {
            "input_size": [in_chans, image_size, image_size],
            "fixed_input_size": False,  # ViTs resample position embeddings, Swins pad
            "interpolation": "bicubic",
            "crop_pct": CROP_PCT,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head" if backbone.kind == "vit" else "head.fc",
        },
        "sopvit": sopvit,
    }


def write_folder(
    backbone: Backbone, config: dict[str, Any], out: Path, head: Mapping[str, Tensor], card: str | None
) -> Path:
    """Write ``model.safetensors`` (timm keys only), ``sopvit.safetensors`` (mask token, ``head.*``),
    ``config.json`` and, when given, the ``README.md`` model card."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(_copies(backbone.model.state_dict()), str(out / WEIGHTS), metadata={"format": "pt"})
    extras = {"mask_token": backbone.mask_token, **{f"head.{k}": v for k, v in head.items()}}
    save_file(_copies(extras), str(out / EXTRAS), metadata={"format": "pt"})
    (out / CONFIG_JSON).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    return out


def is_hub_config(data: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is in timm's hub layout (ours since format 2, or timm's own)."""
    return "sopvit" in data or "pretrained_cfg" in data


def _need(data: Mapping[str, Any], keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{where} has no {', '.join(repr(k) for k in missing)} entry")


def _weights(folder: Path) -> dict[str, Tensor]:
    """The folder's state dict; a pickled ``pytorch_model.bin`` only when no safetensors file is there."""
    if (folder / WEIGHTS).is_file():
        return load_file(str(folder / WEIGHTS))
    if (folder / TORCH_WEIGHTS).is_file():
        path = folder / TORCH_WEIGHTS
        state = read_or_explain(load_torch, path, f"{path} is not a readable state dict")
        if isinstance(state, Mapping):
            return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS} nor {TORCH_WEIGHTS}")


def _restore_mask_token(backbone: Backbone, folder: Path) -> None:
    if not (folder / EXTRAS).is_file():
        return  # the mask token keeps its fresh initialisation, as in format 1
    mask = load_file(str(folder / EXTRAS)).get("mask_token")
    if mask is None:
        return
    if mask.shape != backbone.mask_token.shape:
        raise ValueError(
            f"{folder / EXTRAS}: mask token of shape {tuple(mask.shape)}, expected "
            f"{tuple(backbone.mask_token.shape)}"
        )
    with torch.no_grad():
        backbone.mask_token.copy_(mask)


def _foreign_spec(data: Mapping[str, Any], where: Path) -> tuple[str, str, dict[str, Any]]:
    """``(timm_name, kind, kwargs)`` of a hub config that timm itself wrote."""
    _need(data, ("architecture",), where)
    name = data["architecture"]
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"{where} names architecture {name!r}, which timm {timm.__version__} does not know")
    kind = _KINDS.get(timm.models.model_entrypoint(name).__module__)
    if kind is None:
        raise ValueError(f"{where} holds a timm {name}; sopvit backbones are timm ViTs and Swins")
    kwargs = dict(data.get("model_args") or {})
    input_size = (data.get("pretrained_cfg") or {}).get("input_size")
    if input_size and len(input_size) == 3:
        # Older timm exports recorded the input only in pretrained_cfg; the weights follow it.
        kwargs.setdefault("in_chans", int(input_size[0]))
        kwargs.setdefault("img_size", [int(s) for s in input_size[1:]])
    # Headless like our own backbones, and taking any input size: multi-crop feeds several.
    kwargs |= {"num_classes": 0, "pretrained": False}
    kwargs |= {"dynamic_img_size": True} if kind == "vit" else {"strict_img_size": False}
    return name, kind, kwargs


def load_hub_folder(folder: Path, data: Mapping[str, Any]) -> Backbone:
    """The backbone of a folder in timm's hub layout: written by :func:`write_folder` or by timm."""
    where = folder / CONFIG_JSON
    meta = data.get("sopvit")
    ours = isinstance(meta, Mapping)
    if isinstance(meta, Mapping):
        _need(meta, ("timm_name", "timm_kwargs", "kind"), where)
        name, kind, arch = meta["timm_name"], meta["kind"], meta.get("arch")
        kwargs = dict(meta["timm_kwargs"])
    else:
        (name, kind, kwargs), arch = _foreign_spec(data, where), None
    model = timm.create_model(name, **kwargs)
    weights = _weights(folder)
    if not ours:
        # A classifier's weights: the backbone is built headless.
        classifier = (data.get("pretrained_cfg") or {}).get("classifier") or "head"
        prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        weights = {k: v for k, v in weights.items() if not k.startswith(tuple(f"{p}." for p in prefixes))}
    load_strict(model, weights, folder, f"timm {name} {kwargs}")
    backbone = Backbone(model, kind, arch, name, kwargs)
    _restore_mask_token(backbone, folder)
    return backbone.eval()
