"""The linear probe's presets: "paper" (the protocol behind the published numbers) and "fast".

``LinearConfig.preset`` names one; each of its fields left null (``lrs``, ``weight_decays``,
``optimizers``, ``lars_eta``, ``augment``, ``standardise``, ``val_every``) takes the preset's value, and a
value set in the config or on the command line wins. The comment after each value names its source.

"paper" follows the code the SOP paper's linear numbers come from, github.com/sthalles/sop
``evaluation/eval_linear_multi.py`` (iBOT's ``evaluation/eval_linear_multi.py``, which is DINO's
``eval_linear.py`` with a sweep of heads, with DINOv2's lr list), run through its ``run.sh imagenet_linear``:
fresh RandomResizedCrop(224) + flip views of train every epoch, the frozen tokens fed raw (the head is a
plain ``nn.Linear``: no BatchNorm, no standardisation), every (lr, wd, optimizer) head evaluated on val
after every epoch (``--val_freq 1``) and the best accuracy over epochs and heads reported.
Known differences from that code: its cosine lr steps once per epoch (``CosineAnnealingLR(epochs)``),
here per iteration (both start at the full lr and decay to ~0; the reference's last epoch runs at 2.5e-4
of it); its SGD heads also decay the bias (by at most 1e-6), here no bias is decayed; iBOT's own copy of
the script keeps ``--sweep_lr_only`` (SGD, wd 0) and 45 lrs {1..9} x 10^{-4..0} instead.

"fast" is the cached-feature probe: the features of the unaugmented train images, extracted once (and
cached), standardised, every head evaluated once after the last epoch. ~epochs times cheaper than
"paper" with augmentation, typically a little lower.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class LinearSettings:
    """The resolved values of the preset-controlled fields of ``LinearConfig``."""

    augment: bool  # fresh random-resized crops + flips of train every epoch; False: extracted once
    standardise: bool  # per-feature zero mean / unit std (train statistics); False: raw features
    # evaluate after epochs 1, 1+N, 1+2N, ... and the last (the reference's 0-based `epoch % val_freq == 0`),
    # report the best; 0: after the last epoch only
    val_every: int
    lrs: tuple[float, ...]  # per 256 images: the heads use lr * train_batch_size / 256
    weight_decays: tuple[float, ...]
    optimizers: tuple[str, ...]  # "sgd" and/or "lars"
    lars_eta: float  # LARS trust coefficient: a weight step is scaled by eta * ||w|| / ||g||


PRESET_FIELDS = tuple(f.name for f in fields(LinearSettings))

PRESETS: dict[str, LinearSettings] = {
    "fast": LinearSettings(
        augment=False,  # this library's cached probe (not traced to a reference script)
        standardise=True,  # not traced: lets one lr grid fit backbones of any feature scale
        val_every=0,  # not traced: one evaluation, after the last epoch
        lrs=(1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1),  # not traced: a grid for standardised features
        weight_decays=(0.0, 1e-6),  # eval_linear_multi.py: args.wds = [0, 1e-6]
        optimizers=("sgd", "lars"),  # eval_linear_multi.py: args.optims = ['sgd', 'lars']
        lars_eta=1.0,  # not traced: the plain trust ratio ||w|| / ||g||
    ),
    "paper": LinearSettings(
        augment=True,  # eval_linear_multi.py: train_transform RandomResizedCrop(224) + RandomHorizontalFlip
        standardise=False,  # eval_linear_multi.py: LinearClassifier = nn.Linear on the concatenated tokens
        val_every=1,  # eval_linear_multi.py: --val_freq default 1; best_acc = max over evaluations
        # sthalles/sop eval_linear_multi.py: args.lrs ("from dinov2"), x batch / 256 (linear scaling rule)
        lrs=(1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5),
        weight_decays=(0.0, 1e-6),  # sthalles/sop eval_linear_multi.py: --sweep_lr_only False -> [0, 1e-6]
        optimizers=("sgd", "lars"),  # ... -> ['sgd', 'lars']
        lars_eta=1e-3,  # sthalles/sop utils.LARS: eta=0.001 (eval_linear_multi.py passes none)
    ),
}


def resolve_settings(preset: str, **overrides: Any) -> LinearSettings:
    """``PRESETS[preset]`` with every override that is not None in place of the preset's value."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; expected one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(PRESET_FIELDS)
    if unknown:
        raise ValueError(f"no preset controls {sorted(unknown)}; preset fields: {', '.join(PRESET_FIELDS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
