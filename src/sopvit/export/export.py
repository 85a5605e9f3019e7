"""``export``: write the teacher backbone of a run as timm weights, safetensors, a Hub folder or ONNX.

Only the EMA teacher is exported (it is the model SOP evaluates); optimizer state, the student and the
memory banks of the objective never leave the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from sopvit.data.transforms import MultiCropSpec
from sopvit.export.load import CONFIG_JSON, TIMM_ARGS, WEIGHTS, read_run, teacher_encoder
from sopvit.export.onnx_export import export_onnx
from sopvit.models import Backbone, Encoder
from sopvit.recipe.config import PretrainConfig

ExportFormat = Literal["timm", "safetensors", "hf", "onnx"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
EXPORT_VERSION = 1


def _timm_args(backbone: Backbone) -> dict[str, Any]:
    """What ``timm.create_model(timm_name, **timm_kwargs)`` and our loader need to rebuild the network."""
    return {
        "arch": backbone.arch,
        "kind": backbone.kind,
        "timm_name": backbone.timm_name,
        # JSON has no tuples; timm accepts the lists that come back for Swin's per-stage settings.
        "timm_kwargs": backbone.timm_kwargs,
    }


def _tensors(encoder: Encoder, include_head: bool) -> dict[str, Tensor]:
    # Copies: safetensors refuses tensors that share storage, and callers may keep training the model.
    out = {k: v.detach().clone().contiguous() for k, v in encoder.backbone.model.state_dict().items()}
    if include_head:
        out |= {f"head.{k}": v.detach().clone().contiguous() for k, v in encoder.head.state_dict().items()}
    return out


def model_config(encoder: Encoder, cfg: PretrainConfig, recipe: dict[str, Any], step: int) -> dict[str, Any]:
    """Contents of an export's ``config.json``: architecture, preprocessing and training provenance."""
    backbone = encoder.backbone
    mean, std = MultiCropSpec(in_chans=cfg.data.in_chans).stats
    head = encoder.head
    return {
        "format": "sopvit-backbone",
        "format_version": EXPORT_VERSION,
        **_timm_args(backbone),
        "architecture": backbone.arch,
        "patch_size": backbone.patch_size,
        "image_size": cfg.data.global_size,
        "in_chans": cfg.data.in_chans,
        "embed_dim": backbone.embed_dim,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "mean": list(mean),
        "std": list(std),
        "head": {"in_dim": head.in_dim, "out_dim": head.out_dim, "layers": cfg.model.head_layers},
        "step": step,
        "recipe": recipe,
    }


_CARD = """---
library_name: timm
tags: [self-supervised, vision-transformer, sop, image-feature-extraction]
---
# {arch} pre-trained with SOP

EMA teacher backbone of a SOP (Self-Organizing visual Prototypes) self-supervised pre-training run, after
{step} optimizer steps. It outputs features only (no classifier). Trained on {in_chans}-channel
{image_size} px images normalised with mean {mean} and std {std}.{head_note}

## Load

```python
from sopvit.export import load_pretrained

backbone = load_pretrained("path/to/this/folder")  # sopvit.models.Backbone in eval mode
tokens = backbone.forward_features(images)        # (B, 1 + L, {embed_dim})
```

or with plain timm:

```python
import json, timm
from safetensors.torch import load_file

cfg = json.load(open("config.json"))
model = timm.create_model(cfg["timm_name"], **cfg["timm_kwargs"])
weights = {{k: v for k, v in load_file("model.safetensors").items() if not k.startswith("head.")}}
model.load_state_dict(weights)
```

`config.json` holds the timm arguments, preprocessing statistics and the full training recipe.
"""


def _write_folder(encoder: Encoder, meta: dict[str, Any], out: Path, include_head: bool, card: bool) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(encoder, include_head), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG_JSON).write_text(json.dumps({**meta, "include_head": include_head}, indent=2) + "\n")
    if card:
        note = " The SOP projection head is included under the `head.` prefix." if include_head else ""
        fields = {k: meta[k] for k in ("arch", "step", "in_chans", "image_size", "mean", "std", "embed_dim")}
        (out / "README.md").write_text(_CARD.format(head_note=note, **fields), encoding="utf-8")
    return out


def _file_in(out: Path, suffix: str, default: str) -> Path:
    """``out`` itself when it names a ``suffix`` file, else ``out/default``."""
    return out if out.suffix == suffix else out / default


def export(source: str | Path, fmt: ExportFormat, out: Path, include_head: bool = False) -> Path:
    """Export the teacher backbone of a run.

    Args:
        source: run directory (holding ``checkpoint.pt``) or a checkpoint file.
        fmt: ``"timm"``: ``backbone.pth`` (timm keys, loads strictly into the timm model) and
            ``timm_args.json``; ``"safetensors"``: folder with ``model.safetensors`` and ``config.json``;
            ``"hf"``: that folder plus a ``README.md`` model card; ``"onnx"``: ``backbone.onnx``.
        out: output folder (created), or for timm/onnx a ``.pth``/``.onnx`` file path.
        include_head: also export the SOP projection head (timm: separate ``<name>_head.pth``, so the
            backbone file stays strictly loadable; safetensors/hf: ``head.*`` keys). Not for ONNX.

    Returns:
        The written ``.pth`` / ``.onnx`` file, or the folder for safetensors/hf.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and include_head:
        raise ValueError("include_head is not supported for onnx: the graph outputs backbone features only")
    state, cfg, _ = read_run(source)
    encoder = teacher_encoder(state, cfg)
    out = Path(out)
    if fmt == "timm":
        path = _file_in(out, ".pth", "backbone.pth")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_tensors(encoder, False), path)
        args = {**_timm_args(encoder.backbone), "step": int(state["step"])}
        (path.parent / TIMM_ARGS).write_text(json.dumps(args, indent=2) + "\n")
        if include_head:
            head = {k: v.detach().clone() for k, v in encoder.head.state_dict().items()}
            torch.save(head, path.with_name(f"{path.stem}_head.pth"))
        return path
    if fmt == "onnx":
        path = _file_in(out, ".onnx", "backbone.onnx")
        export_onnx(encoder.backbone, path, cfg.data.in_chans, cfg.data.global_size)
        return path
    meta = model_config(encoder, cfg, state["config"], int(state["step"]))
    return _write_folder(encoder, meta, out, include_head, card=fmt == "hf")
