"""What a run saves and restores: weights, optimizer, the objective's state (memories, centers), the step
and every rank's RNG, as one file or as a sharded directory (the run's parallel mode decides).

Sharded checkpoints go through ``torch.distributed.checkpoint.state_dict``: parameter-name keyed state
dicts that read the same from sharded (FSDP) and whole modules, so a run saved on N ranks resumes on M,
sharded or not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sopvit import distributed as dist
from sopvit.checkpoints.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from sopvit.checkpoints.sharded import (
    load_sharded,
    read_meta,
    remove_sharded,
    save_sharded,
    saved_keys,
)
from sopvit.config import ConfigError
from sopvit.methods import get_method
from sopvit.models import StudentTeacher


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# Settings that fix tensor shapes: a run can only continue with the same values (and the same method).
_SHAPE_KEYS = {
    "model": (
        "arch",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "head_hidden_dim",
        "head_bottleneck_dim",
        "head_layers",
    ),
    "data": ("in_chans",),
}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse, naming the key, to resume a run whose method, architecture or memories differ from the
    config (runs written before ``method`` existed are SOP runs)."""
    where = path.parent
    old_method, method = saved.get("method", "sop"), current["method"]
    if old_method != method:
        raise ConfigError(
            f"the run in {where} was trained with method={old_method}, this config has {method}: "
            "use another run.output_dir or the run's own config.yaml",
            "method",
        )
    for section, keys in {**_SHAPE_KEYS, method: get_method(method).shape_keys}.items():
        for key in keys:
            old, new = saved.get(section, {}).get(key), current[section][key]
            if old != new:
                raise ConfigError(
                    f"the run in {where} was trained with {section}.{key}={old}, "
                    f"this config has {new}: use another run.output_dir or the run's own config.yaml",
                    f"{section}.{key}",
                )


@dataclass
class RunState:
    """The stateful parts of a run, whatever wraps them (``model.student`` is the bare module)."""

    model: StudentTeacher
    optimizer: torch.optim.Optimizer
    objective: Any  # the method's Objective, an nn.Module
    sharded: bool  # write sharded directories rather than one file

    def _tensors(self) -> dict[str, Any]:
        student, teacher = self.model.student, self.model.teacher
        return {
            "student": get_model_state_dict(student),
            "teacher": get_model_state_dict(teacher),
            "optimizer": get_optimizer_state_dict(student, self.optimizer),
            "objective": self.objective.state_dict(),
        }

    def save(self, run_dir: Path, meta: dict[str, Any]) -> None:
        """Write a checkpoint of this state and ``meta`` (step, config, ...). A collective."""
        if self.sharded:
            save_sharded(self._tensors(), meta, run_dir, int(meta["step"]))
            return
        if dist.is_main_process():
            save_checkpoint(
                {
                    **meta,
                    "student": self.model.student.state_dict(),
                    "teacher": self.model.teacher.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "objective": self.objective.state_dict(),
                },
                Path(run_dir) / LATEST,
            )
            remove_sharded(run_dir)
        dist.barrier()

    def load(self, path: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Restore from ``path`` (a file or a sharded directory) and return its metadata (step, rng, ...).

        Raises:
            CheckpointError: another format version, or unreadable.
            ConfigError: the run's method or shapes differ from ``config``.
        """
        path = Path(path)
        meta = read_meta(path) if path.is_dir() else load_checkpoint(path)
        if meta["format_version"] != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was written by an older sopvit (format {meta['format_version']}) whose optimizer "
                f"groups differ from this version's (format {FORMAT_VERSION}), so the run cannot resume "
                "exactly; export or evaluate it as it is, or start a new run.output_dir"
            )
        check_compatible(meta.get("config", {}), config, path)
        if path.is_dir():
            self._load_sharded(path)
        else:
            self._load_file(meta)
        return meta

    def _load_sharded(self, path: Path) -> None:
        state = self._tensors()
        # A parameter the method kept frozen so far (DINO's last layer) has no optimizer state yet, and
        # must not get one: Adam's first real step differs from a step after an all-zero one.
        saved = saved_keys(path)
        absent = [
            name
            for name in state["optimizer"]["state"]
            if not any(k.startswith(f"optimizer.state.{name}.") for k in saved)
        ]
        for name in absent:
            del state["optimizer"]["state"][name]
        load_sharded(state, path)
        student, teacher = self.model.student, self.model.teacher
        set_model_state_dict(student, state["student"])
        set_model_state_dict(teacher, state["teacher"])
        partial = StateDictOptions(strict=False)  # the frozen parameters' state is absent, as saved
        set_optimizer_state_dict(student, self.optimizer, state["optimizer"], options=partial)
        params = dict(student.named_parameters())
        for name in absent:
            self.optimizer.state.pop(params[name], None)
        self.objective.load_state_dict(state["objective"])

    def _load_file(self, state: dict[str, Any]) -> None:
        student, teacher = self.model.student, self.model.teacher
        if dist.shard_group(list(student.parameters())) is None:  # whole modules take the file as written
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["objective"])
            return
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(student, state["student"], options=full)
        set_model_state_dict(teacher, state["teacher"], options=full)
        set_optimizer_state_dict(
            student, self.optimizer, _by_name(state["optimizer"], self.optimizer, student), options=full
        )
        self.objective.load_state_dict(state["objective"])


def _by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` (parameters numbered in group order) keyed by parameter names."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]
        ],
    }


def restore_rng(saved: list[dict[str, Any]] | dict[str, Any], world: int, rank: int, seed: int) -> None:
    """Continue this rank's RNG streams; on another world size, keep ranks distinct and reproducible."""
    if isinstance(saved, dict):  # written before every rank's states were kept
        saved = [saved]
    if len(saved) == world:
        set_rng_state(saved[rank])
    else:
        set_rng_state(saved[0])
        torch.manual_seed(seed)
