"""``export``: write the teacher backbone of a run as timm weights, safetensors, a Hub folder or ONNX.

Only the EMA teacher is exported (it is the model SOP evaluates); optimizer state, the student and the
memory banks of the objective never leave the checkpoint. The folders (``safetensors``, ``hf``) are in
timm's Hub layout (:mod:`sopvit.export.hf`), so people without sopvit can load them with timm or
transformers; ``hf`` adds the model card that the Hub shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from sopvit.data.transforms import MultiCropSpec
from sopvit.export.hf import EXTRAS, FOLDER_VERSION, hub_config, write_folder
from sopvit.export.load import TIMM_ARGS, read_run, teacher_encoder
from sopvit.export.onnx_export import export_onnx
from sopvit.models import Backbone, Encoder
from sopvit.recipe.config import PretrainConfig

ExportFormat = Literal["timm", "safetensors", "hf", "onnx"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def _timm_args(backbone: Backbone) -> dict[str, Any]:
    """What ``timm.create_model(timm_name, **timm_kwargs)`` and our loader need to rebuild the network."""
    return {
        "arch": backbone.arch,
        "kind": backbone.kind,
        "timm_name": backbone.timm_name,
        # JSON has no tuples; timm accepts the lists that come back for Swin's per-stage settings.
        "timm_kwargs": backbone.timm_kwargs,
    }


def _tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    # Copies: callers may keep training the model.
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def sopvit_meta(
    encoder: Encoder, cfg: PretrainConfig, recipe: dict[str, Any], step: int, source: Path, include_head: bool
) -> dict[str, Any]:
    """The ``"sopvit"`` entry of an export's ``config.json``: architecture, features and provenance."""
    backbone, head = encoder.backbone, encoder.head
    mean, std = MultiCropSpec(in_chans=cfg.data.in_chans).stats
    return {
        "format": "sopvit-backbone",
        "format_version": FOLDER_VERSION,
        **_timm_args(backbone),
        "patch_size": backbone.patch_size,
        "image_size": cfg.data.global_size,
        "in_chans": cfg.data.in_chans,
        "embed_dim": backbone.embed_dim,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "mean": list(mean),
        "std": list(std),
        "method": recipe.get("method"),
        "step": step,
        "source_run": str(source),
        "extras": {"file": EXTRAS, "mask_token": True, "head": include_head},
        "head": {"in_dim": head.in_dim, "out_dim": head.out_dim, "layers": cfg.model.head_layers},
        "recipe": recipe,
    }


_TOKENS = {
    "vit": "(B, {prefix} + L, {dim}) tokens after the final norm; [:, 0] is the [CLS] feature",
    "swin": "(B, H, W, {dim}) tokens after the final norm; their mean is the image feature",
}

_CARD = """---
library_name: timm
pipeline_tag: image-feature-extraction
tags: [timm, transformers, self-supervised, sop, image-feature-extraction]
---
# {arch} pre-trained with SOP

EMA teacher backbone of a SOP (Self-Organizing visual Prototypes) self-supervised pre-training run, after
{step} optimizer steps. It outputs features only (no classifier): timm's `{timm_name}` with the
`model_args` of `config.json`. Trained on {in_chans}-channel {image_size} px images normalised with mean
{mean} and std {std}.

## Load

With timm alone (>= 1.0.16 for `local-dir:`; `hf-hub:USER/REPO` once pushed to the Hub):

```python
import timm

model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()
tokens = model.forward_features(images)  # {tokens}
```

With transformers (>= 4.47, `TimmWrapperModel`):

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("path/to/this/folder").eval()
tokens = model(images, do_pooling=False).last_hidden_state
```

With sopvit, which also restores the trained mask token:

```python
from sopvit.export import load_pretrained

backbone = load_pretrained("path/to/this/folder")  # sopvit.models.Backbone in eval mode
out = backbone(images)                              # {{"cls": (B, {dim}), "patch": (B, L, {dim})}}
```

`config.json` holds timm's architecture, `model_args` and preprocessing (`pretrained_cfg`); its `sopvit`
entry holds the training step and the full recipe. `{extras}` holds the mask token{head_note}.
"""


def model_card(meta: dict[str, Any]) -> str:
    """The ``README.md`` of an ``hf`` export, from its ``"sopvit"`` metadata."""
    tokens = _TOKENS[meta["kind"]].format(prefix=meta["num_prefix_tokens"], dim=meta["embed_dim"])
    note = " and the SOP projection head (`head.*`)" if meta["extras"]["head"] else ""
    fields = ("arch", "step", "timm_name", "in_chans", "image_size", "mean", "std")
    return _CARD.format(
        tokens=tokens, dim=meta["embed_dim"], extras=EXTRAS, head_note=note, **{k: meta[k] for k in fields}
    )


def _file_in(out: Path, suffix: str, default: str) -> Path:
    """``out`` itself when it names a ``suffix`` file, else ``out/default``."""
    return out if out.suffix == suffix else out / default


def export(source: str | Path, fmt: ExportFormat, out: Path, include_head: bool = False) -> Path:
    """Export the teacher backbone of a run.

    Args:
        source: run directory (holding ``checkpoint.pt``, or ``checkpoint.latest`` and the sharded
            ``checkpoint-NNNNNN`` directory it names), a checkpoint file or a sharded directory.
        fmt: ``"timm"``: ``backbone.pth`` (timm keys, loads strictly into the timm model) and
            ``timm_args.json``; ``"safetensors"``: folder in timm's Hub layout (``config.json``,
            ``model.safetensors`` and ``sopvit.safetensors``, which holds the mask token); ``"hf"``: that
            folder plus a ``README.md`` model card; ``"onnx"``: ``backbone.onnx``.
        out: output folder (created), or for timm/onnx a ``.pth``/``.onnx`` file path.
        include_head: also export the SOP projection head, beside the strictly loadable backbone weights
            (timm: ``<name>_head.pth``; safetensors/hf: ``head.*`` keys of ``sopvit.safetensors``). Not for
            ONNX.

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
        torch.save(_tensors(encoder.backbone.model), path)
        args = {**_timm_args(encoder.backbone), "step": int(state["step"])}
        (path.parent / TIMM_ARGS).write_text(json.dumps(args, indent=2) + "\n")
        if include_head:
            torch.save(_tensors(encoder.head), path.with_name(f"{path.stem}_head.pth"))
        return path
    if fmt == "onnx":
        path = _file_in(out, ".onnx", "backbone.onnx")
        export_onnx(encoder.backbone, path, cfg.data.in_chans, cfg.data.global_size)
        return path
    head = encoder.head.state_dict() if include_head else {}
    meta = sopvit_meta(encoder, cfg, state["config"], int(state["step"]), Path(source), include_head)
    config = hub_config(encoder.backbone, cfg.data.global_size, meta["mean"], meta["std"], meta)
    return write_folder(encoder.backbone, config, out, head, model_card(meta) if fmt == "hf" else None)
