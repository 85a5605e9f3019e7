"""Last-block [CLS] attention of a trained teacher, as per-head heatmaps over the patch grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from sopvit.checkpoints.run_dir import checkpoint_path, read_checkpoint
from sopvit.config.coerce import merge
from sopvit.config.loader import validate_config
from sopvit.data.eval_transforms import EvalTransform
from sopvit.data.transforms import to_uint8_chw
from sopvit.models import Backbone
from sopvit.recipe.build import build_model
from sopvit.recipe.config import PretrainConfig, pretrain_config_type, upgrade_saved


@dataclass(frozen=True)
class Run:
    """A saved run: its resolved config and the checkpoint's state dict."""

    checkpoint: Path
    config: PretrainConfig
    state: dict[str, Any]


def load_run(run_dir_or_checkpoint: str | Path) -> Run:
    """Read a run's checkpoint (``checkpoint.pt``, or the sharded directory ``checkpoint.latest`` names,
    gathered here into whole tensors), or the given checkpoint file or directory, and rebuild its config.

    The config comes from the checkpoint itself rather than ``config.yaml``, so a checkpoint copied
    away from its run directory is still self-describing.
    """
    try:
        checkpoint = checkpoint_path(run_dir_or_checkpoint)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot load a sopvit run: {err}") from err
    state = read_checkpoint(checkpoint)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"checkpoint {checkpoint} holds no 'config' mapping; was it written by sopvit?")
    config = merge(pretrain_config_type(), None, upgrade_saved(state["config"]), "")
    validate_config(config)
    return Run(checkpoint, config, state)


def load_teacher_backbone(run: Run) -> Backbone:
    """The run's teacher backbone (the encoder SOP evaluates), in eval mode on the CPU."""
    if "teacher" not in run.state:
        raise ValueError(f"checkpoint {run.checkpoint} holds no 'teacher' weights")
    # Building the model draws random initial weights; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        model = build_model(run.config)
    model.teacher.load_state_dict(run.state["teacher"])
    backbone = model.teacher.backbone
    backbone.eval()
    return backbone


def _as_batch(image: Image.Image | Tensor, size: int, in_chans: int, device: torch.device) -> Tensor:
    return EvalTransform(size, in_chans=in_chans)(image).unsqueeze(0).to(device)


@torch.no_grad()
def cls_attention(backbone: Backbone, image: Image.Image | Tensor, size: int, in_chans: int) -> Tensor:
    """Full [CLS] row of the last block's attention, (heads, 1 + L): a probability over all tokens."""
    device = next(backbone.parameters()).device
    attn = backbone.last_block_attention(_as_batch(image, size, in_chans, device))
    return attn[0, :, 0, :].cpu()


def attention_maps(backbone: Backbone, image: Image.Image | Tensor, size: int, in_chans: int) -> Tensor:
    """[CLS]-to-patch attention of the last block, (heads, gh, gw), float32 on the CPU.

    ``image`` (PIL, or uint8 (C, H, W)) is preprocessed like evaluation (resize, centre crop to
    ``size``, normalise). Values are the softmax probabilities restricted to patch tokens, not
    renormalised: the mass the [CLS] token puts on itself (and on registers) stays visible as a
    shortfall from 1.
    """
    row = cls_attention(backbone, image, size, in_chans)
    gh, gw = backbone.grid_size(size)
    patches = row[:, backbone.num_prefix_tokens :]
    if patches.shape[1] != gh * gw:
        raise ValueError(
            f"attention covers {patches.shape[1]} patch tokens but the grid for {size} px is {gh}x{gw}"
        )
    return patches.reshape(-1, gh, gw)


def display_view(image: Image.Image | Tensor, size: int, in_chans: int) -> np.ndarray:
    """The crop the network sees, as uint8 (H, W) or (H, W, 3), for drawing under the heatmaps."""
    crop = EvalTransform(size, in_chans=in_chans)
    # Same geometry as EvalTransform, without normalisation, so the heatmaps line up pixel for pixel.
    geometry = v2.Compose(
        [
            v2.Resize(crop.resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
        ]
    )
    chw = geometry(to_uint8_chw(image, in_chans))
    return to_numpy_image(chw)


def to_numpy_image(chw: Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W) for grayscale, (H, W, 3) for colour; what ``imshow`` expects."""
    array = chw.cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))


def save_attention_figure(
    run_dir_or_checkpoint: str | Path, image_path: str | Path, out_png: str | Path, size: int | None = None
) -> Path:
    """Write a PNG of ``image_path`` next to one upsampled [CLS] attention heatmap per teacher head.

    ``size`` defaults to the run's ``data.global_size`` (the resolution the teacher was trained at).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, whatever the user's backend is
    import matplotlib.pyplot as plt

    image_path, out_png = Path(image_path), Path(out_png)
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} does not exist")
    run = load_run(run_dir_or_checkpoint)
    size = run.config.data.global_size if size is None else size
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    in_chans = run.config.data.in_chans
    try:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB" if in_chans == 3 else "L")
    except OSError as err:
        raise ValueError(f"cannot read image {image_path}: {err}") from err

    backbone = load_teacher_backbone(run)
    maps = attention_maps(backbone, image, size, in_chans)
    # Nearest upsampling keeps patch boundaries honest on the tiny grids of small images.
    up = torch.nn.functional.interpolate(maps[None], size=(size, size), mode="nearest")[0].numpy()
    view = display_view(image, size, in_chans)

    heads = maps.shape[0]
    cols = min(heads + 1, 5)
    rows = math.ceil((heads + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    flat = axes.ravel()
    flat[0].imshow(view, cmap="gray" if view.ndim == 2 else None, vmin=0, vmax=255)
    flat[0].set_title(f"input ({size} px)", fontsize=9)
    for h in range(heads):
        ax = flat[h + 1]
        ax.imshow(view, cmap="gray" if view.ndim == 2 else None, vmin=0, vmax=255)
        ax.imshow(up[h], cmap="inferno", alpha=0.6)
        ax.set_title(f"head {h} (max {maps[h].max().item():.2f})", fontsize=9)
    for ax in flat:
        ax.axis("off")
    step = run.state.get("step", "?")
    fig.suptitle(f"[CLS] attention, last block, teacher at step {step}", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out_png, dpi=100)
    finally:
        plt.close(fig)
    return out_png
