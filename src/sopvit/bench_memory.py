"""``sopvit bench --memory``: the bytes each rank holds for a pre-training run, DDP or FSDP, at 1..64 ranks.

Counted on the ``meta`` device, so ViT-g costs nothing to size: the model and objective are built exactly
as training builds them (:func:`sopvit.recipe.build.build_model`, ``build_objective``) and their shapes
are read. FSDP's numbers follow ``train/parallel.py``'s ``Sharded`` (FSDP2 ``fully_shard`` per block,
backbone and encoder): every parameter is padded on dim 0 to a multiple of the world size, so a rank
holds ``ceil(dim0 / world) * prod(other dims)`` elements of each. Activations are not counted; ``--measure``
runs one real step in a fresh process for them, since only a measurement sees the autograd graph.

This module must not import ``sopvit.bench`` (they are independent siblings in the import-linter layers):
the one real step comes in as a callable from the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from sopvit.models import Encoder
from sopvit.models.factory import ARCHS
from sopvit.recipe.build import build_model, build_objective
from sopvit.recipe.config import PretrainConfig, load_pretrain_config

SHOWN_ARCHS = tuple(f"vit_{s}_patch{p}_224" for s, p in [("small", 16), ("base", 16), ("large", 16)])
SHOWN_ARCHS += ("vit_huge_patch14_224", "vit_giant_patch14_224")
WORLDS = (1, 2, 4, 8, 16, 32, 64)
MARKDOWN_WORLDS = (1, 8, 64)
CARDS_GIB = (24, 40, 80)
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "vit_small_in1k.yaml"
GIB = 2**30
PARTS = ("params", "grads", "adamw", "teacher", "banks")


@dataclass(frozen=True)
class MemoryRow:
    """Bytes one rank holds for one (arch, parallel, world) configuration."""

    arch: str
    parallel: str
    world: int
    params: int  # student, fp32 master weights
    grads: int  # fp32, for the parameters that require grad
    adamw: int  # exp_avg + exp_avg_sq + a 0-d float32 step per parameter
    teacher: int  # the EMA teacher, fp32
    banks: int  # the objective's memory banks and buffers, whole on every rank
    gathered: int  # FSDP only: the largest unit all-gathered for its forward/backward (transient)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.adamw + self.teacher + self.banks


def shard_numel(shape: Sequence[int], world: int) -> int:
    """Elements one rank stores of a tensor FSDP2 shards on dim 0 over ``world`` ranks (padded)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def _units(encoder: Encoder) -> list[list[nn.Parameter]]:
    """Parameters of each ``fully_shard`` unit, in the order parallel.Sharded wraps them: a unit manages
    the parameters its already-wrapped submodules do not."""
    seen: set[int] = set()
    units = []
    for module in [*encoder.backbone.shard_units(), encoder.backbone, encoder]:
        own = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        units.append(own)
    return units


def _bytes(tensors: Iterable[torch.Tensor], world: int) -> int:
    return sum(shard_numel(t.shape, world) * t.element_size() for t in tensors)


def memory_rows(
    cfg: PretrainConfig, parallel: str, worlds: Sequence[int], gather_bytes: int
) -> list[MemoryRow]:
    """Per-rank bytes of ``cfg`` under ``parallel`` ("ddp" or "fsdp") at each world size; ``gather_bytes``
    is the size of a gathered element (4 for fp32, 2 for bf16 compute)."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    bad = [w for w in worlds if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad or not worlds:
        raise ValueError(f"world sizes must be integers >= 1, got {list(worlds)}")
    with torch.device("meta"):
        model = build_model(cfg)
        objective = cast(nn.Module, build_objective(cfg, "meta"))  # it refuses anything else
    banks = sum(t.numel() * t.element_size() for t in [*objective.parameters(), *objective.buffers()])
    student = list(model.student.parameters())
    trained = [p for p in student if p.requires_grad]
    teacher = list(model.teacher.parameters())
    # fully_shard shards parameters only: buffers (sopvit's ViTs have none) stay whole on every rank.
    whole = [_bytes(m.buffers(), 1) for m in (model.student, model.teacher)]
    units = _units(model.student)
    rows = []
    for world in worlds:
        shard = 1 if parallel == "ddp" or world == 1 else world  # FSDP at world 1 runs replicated
        # The all-gather output is the padded whole: world shards of each parameter, in the compute dtype.
        unit = max(sum(shard_numel(p.shape, shard) for p in u) for u in units) * shard * gather_bytes
        grads = _bytes(trained, shard)
        row = MemoryRow(
            cfg.model.arch,
            parallel,
            world,
            params=_bytes(student, shard) + whole[0],
            grads=grads,
            adamw=2 * grads + 4 * len(trained),  # exp_avg, exp_avg_sq and a float32 step per parameter
            teacher=_bytes(teacher, shard) + whole[1],
            banks=banks,
            gathered=unit if shard > 1 else 0,
        )
        rows.append(row)
    return rows


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _cells(r: MemoryRow) -> list[str]:
    gathered = _gib(r.gathered) if r.parallel == "fsdp" and r.world > 1 else "-"
    return [r.arch, r.parallel, str(r.world), *(_gib(getattr(r, p)) for p in PARTS), _gib(r.total), gathered]


HEADER = ["arch", "parallel", "ranks", *PARTS, "total", "gathered"]


def format_text(rows: Sequence[MemoryRow]) -> str:
    table = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in table
    )


def format_markdown(rows: Sequence[MemoryRow]) -> str:
    shown = [r for r in rows if r.world in MARKDOWN_WORLDS] or list(rows)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---:|" * (len(HEADER) - 3)]
    return "\n".join([*lines, *("| " + " | ".join(_cells(r)) + " |" for r in shown)])


def fit_lines(rows: Sequence[MemoryRow]) -> list[str]:
    """Per card: whether each arch fits with DDP, and the fewest FSDP ranks that fit (total + gathered)."""
    lines = []
    for card in CARDS_GIB:
        parts = []
        for arch in dict.fromkeys(r.arch for r in rows):
            name = ARCHS[arch].description.split(",")[0].split(" (")[0] if arch in ARCHS else arch
            mine = [r for r in rows if r.arch == arch and r.total + r.gathered <= card * GIB]
            fits = {p: [r.world for r in mine if r.parallel == p] for p in ("ddp", "fsdp")}
            most = max(r.world for r in rows if r.arch == arch)
            fsdp = f"FSDP >= {min(fits['fsdp'])} ranks" if fits["fsdp"] else f"FSDP no (<= {most} ranks)"
            parts.append(f"{name}: DDP {'yes' if fits['ddp'] else 'no'}, {fsdp}")
        lines.append(f"{card} GB card: " + "; ".join(parts))
    return lines


def measure_child(cfg: PretrainConfig, run_step: Callable[[PretrainConfig], torch.device]) -> dict[str, Any]:
    """Run one real training step in this (fresh) process and return its peak memory: CUDA's peak
    allocation on a GPU, else this process's peak RSS, which includes Python and torch themselves (hence
    ``baseline``, the peak before the model was built; bytes)."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    device = run_step(cfg)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, what, baseline = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated", 0
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    return {"device": device.type, "what": what, "peak": peak, "baseline": baseline, "seconds": seconds}


def measure(config: str, overrides: Sequence[str]) -> list[dict[str, Any]]:
    """One step without and with activation checkpointing, each in a fresh ``python -m sopvit`` process
    so that neither peak includes the other's."""
    results = []
    for checkpointing in (False, True):
        extra = f"train.activation_checkpointing={str(checkpointing).lower()}"
        cmd = [sys.executable, "-m", "sopvit", "bench", "--measure-child", "--config", config, *overrides]
        done = subprocess.run([*cmd, extra], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the measured step ({extra}) failed with exit code {done.returncode}: {tail}")
        last = done.stdout.strip().splitlines()[-1]
        results.append({"activation_checkpointing": checkpointing, **json.loads(last)})
    return results


def _world_sizes(text: str | None) -> list[int]:
    try:
        return [int(w) for w in text.split(",")] if text else list(WORLDS)
    except ValueError:
        raise ValueError(f"--world-sizes takes integers separated by commas, got {text!r}") from None


def memory_command(args: argparse.Namespace, run_step: Callable[[PretrainConfig], torch.device]) -> int:
    """``sopvit bench --memory [--markdown] [--measure]`` and its hidden ``--measure-child``."""
    config = args.config or str(DEFAULT_RECIPE)
    overrides = ["data.path=-", *args.overrides]  # no data is read: image-folder recipes need no path
    if args.measure_child:
        print(json.dumps(measure_child(load_pretrain_config(config, overrides), run_step)))
        return 0
    worlds, dtype = _world_sizes(args.world_sizes), args.precision or "fp32"
    rows = []
    given = any(o.startswith("model.arch=") for o in args.overrides)  # an override names one arch
    for arch in args.arch or ([""] if given else SHOWN_ARCHS):
        cfg = load_pretrain_config(config, [*overrides, *[f"model.arch={arch}"] * bool(arch)])
        for parallel in ("ddp", "fsdp"):
            rows.extend(memory_rows(cfg, parallel, worlds, 2 if dtype == "bf16" else 4))
    shown = args.config or "configs/pretrain/vit_small_in1k.yaml"
    print(f"Per-rank memory (GiB) of {shown}: fp32 weights, gradients, AdamW, EMA teacher; banks on every")
    print(
        f"rank. 'gathered': FSDP's largest unit all-gathered for forward/backward, in {dtype}; not in total."
    )
    print(format_markdown(rows) if args.markdown else format_text(rows))
    print("\nFits (total + gathered <= nominal GiB), activations NOT included, nor CUDA context/DDP buckets:")
    print("\n".join(("- " if args.markdown else "  ") + line for line in fit_lines(rows)))
    if args.measure:
        step = [f"train.batch_size={args.batch_size}"] * (args.batch_size is not None)
        step += [f"train.precision={args.precision}"] * (args.precision is not None)
        step += [f"model.arch={a}" for a in (args.arch or [])[:1]]  # the first --arch, else the recipe's
        cfg = load_pretrain_config(config, [*overrides, *step])
        d = cfg.data
        print(
            f"\nmeasured: one {cfg.method} step of {cfg.model.arch}, batch {cfg.train.batch_size} "
            f"(2x{d.global_size} + {d.n_locals}x{d.local_size}), a fresh process each"
        )
        for m in measure(config, [*overrides, *step]):
            print(
                f"  activation checkpointing {'on ' if m['activation_checkpointing'] else 'off'}: "
                f"{m['what']} {m['peak'] / GIB:.2f} GiB on {m['device']} "
                f"(before building: {m['baseline'] / GIB:.2f} GiB), build + step {m['seconds']:.1f} s"
            )
    return 0
