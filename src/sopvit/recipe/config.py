"""The composition root's config: ``sopvit pretrain``'s typed schema.

Each section lives beside the code it configures (``model`` in models/, ``data`` in data/, each method's in
methods/); ``train`` and ``run`` configure the loop and its run directory and live here. The method
sections come from the registry: :func:`pretrain_config_type` is the schema with one section per
registered method, so a newly registered method is configurable like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sopvit.config import load_config
from sopvit.config.coerce import check
from sopvit.data.config import DataConfig, DatasetName
from sopvit.methods import MethodSpec, get_method, method_names
from sopvit.models.config import ModelConfig


@dataclass
class TrainConfig:
    epochs: float = 100  # a fraction ends the run part-way through an epoch (equal-time comparisons)
    max_steps: int | None = None  # stop early (smoke tests, benchmarks); schedules still span `epochs`
    batch_size: int = 64  # per process
    accum_steps: int = 1
    lr: float = 5e-4  # for a global batch of 256; scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.996
    momentum_end: float = 1.0
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    patch_teacher_temp: float | None = None  # None: follow the [CLS] teacher temperature
    clip_grad: float = 3.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # compile each transformer block (torch.compile)
    # ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state sharded over
    # ranks (FSDP2), for models that do not fit one GPU with DDP (docs/scale.md)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute each student block's activations in backward
    on_nan: Literal["stop", "skip"] = "stop"

    def validate(self) -> None:
        check(self.epochs > 0, "epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0 or null")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.accum_steps >= 1, "accum_steps", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.weight_decay >= 0 and self.weight_decay_end >= 0, "weight_decay", "must be >= 0")
        check(
            0 <= self.momentum <= self.momentum_end <= 1,
            "momentum",
            "need 0 <= momentum <= momentum_end <= 1",
        )
        for name in ("teacher_temp", "warmup_teacher_temp"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(
            self.patch_teacher_temp is None or self.patch_teacher_temp > 0,
            "patch_teacher_temp",
            "must be > 0",
        )
        check(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 disables clipping)")


DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def signal_number(name: str) -> int:
    """``"SIGTERM"`` (or ``"TERM"``) -> its number; ValueError naming some catchable ones otherwise."""
    full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    if full not in signal.Signals.__members__ or full in ("SIGKILL", "SIGSTOP"):
        raise ValueError(
            f"{name!r} is not a signal a run can catch; use e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP"
        )
    return int(signal.Signals[full])


@dataclass
class RunConfig:
    output_dir: str = "runs/pretrain"
    resume: bool = True  # continue from output_dir/checkpoint.pt; false refuses to touch an existing run
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    log_every: int = 20
    knn_every: int = 0  # steps between online k-NN evaluations (0: off)
    knn_dataset: DatasetName | None = None
    knn_path: str | None = None
    knn_limit: int | None = 10000
    tensorboard: bool = True
    progress: bool = True
    # Caught on every rank: the run saves at the next step boundary and exits with EXIT_STOPPED (75).
    stop_signals: tuple[str, ...] = DEFAULT_STOP_SIGNALS

    def validate(self) -> None:
        check(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")
        for name in self.stop_signals:
            try:
                signal_number(name)
            except ValueError as err:
                check(False, "stop_signals", str(err))
        check(self.log_every > 0, "log_every", "must be > 0")
        check(self.knn_every >= 0, "knn_every", "must be >= 0")
        check(
            self.knn_every == 0 or self.knn_dataset is not None,
            "knn_dataset",
            "is required when knn_every > 0",
        )


@dataclass
class PretrainConfig:
    """The sections every run has; :func:`pretrain_config_type` adds one section per registered method."""

    method: str = "sop"  # sop: the paper's; ibot, dino: the baselines it compares with
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def spec(self) -> MethodSpec:
        """The registry row of the method that runs."""
        return get_method(self.method)

    @property
    def method_config(self) -> Any:
        """The section of the method that runs (e.g. ``sop``)."""
        return getattr(self, self.method)

    def validate(self) -> None:
        names = method_names()
        check(
            self.method in names,
            "method",
            f"must be one of {', '.join(map(repr, names))}, got {self.method!r}",
        )
        check(
            hasattr(self, self.method), "method", f"{self.method!r} was registered after this config was made"
        )
        if self.spec.check_head is not None:
            self.spec.check_head(self.method_config, self.model.head_bottleneck_dim)


def pretrain_config_type() -> type[PretrainConfig]:
    """The full schema: :class:`PretrainConfig` plus a section per registered method, in registry order."""
    return _with_sections(tuple((name, get_method(name).config) for name in method_names()))


@functools.cache
def _with_sections(sections: tuple[tuple[str, type], ...]) -> type[PretrainConfig]:
    fields = [(name, cls, field(default_factory=cls)) for name, cls in sections]
    schema = dataclasses.make_dataclass("PretrainConfig", fields, bases=(PretrainConfig,))
    schema.__module__ = __name__
    schema.__doc__ = PretrainConfig.__doc__
    return schema


def load_pretrain_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults, then the recipe at ``path``, then ``key=value`` overrides, validated."""
    return load_config(pretrain_config_type(), path, overrides)


def upgrade_saved(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict a checkpoint of an older sopvit saved, with retired keys replaced, so its runs still
    export, evaluate and visualise (recipes and overrides with a retired key are refused instead)."""
    out = dict(values)
    data = out.get("data")
    if isinstance(data, Mapping) and "batched_augment" in data:
        data = dict(data)
        data["augment_on"] = "device" if data.pop("batched_augment") else "workers"
        out["data"] = data
    return out
