"""The typed configuration of ``sopvit pretrain``; YAML recipes in configs/pretrain/ fill it in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from sopvit.baselines.config import DINOConfig, IBOTConfig
from sopvit.config.coerce import check
from sopvit.data.transforms import MultiCropSpec
from sopvit.sop.objective import SOPConfig

DatasetName = Literal["folder", "imagenet", "fashion_mnist", "cifar10", "cifar100"]
AugmentOn = Literal["workers", "device"]
Method = Literal["sop", "ibot", "dino"]


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16_224"
    patch_size: int | None = None  # None: the architecture's own
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.1
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3

    def validate(self) -> None:
        check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)")
        check(self.head_hidden_dim > 0, "head_hidden_dim", "must be > 0")
        check(self.head_bottleneck_dim > 0, "head_bottleneck_dim", "must be > 0")
        check(self.head_layers >= 1, "head_layers", "must be >= 1")


@dataclass
class DataConfig:
    RENAMED: ClassVar[dict[str, str]] = {
        "batched_augment": "write data.augment_on: device (was batched_augment: true) or workers (false)"
    }
    dataset: DatasetName = "folder"
    path: str | None = None  # folder/imagenet: required; others: where to find or download them
    # The crop fields are MultiCropSpec's: their defaults and checks are defined there, once.
    in_chans: int = MultiCropSpec.in_chans
    global_size: int = MultiCropSpec.global_size
    local_size: int = MultiCropSpec.local_size
    n_locals: int = MultiCropSpec.n_locals
    global_scale: tuple[float, float] = MultiCropSpec.global_scale
    local_scale: tuple[float, float] = MultiCropSpec.local_scale
    blur_sigma: tuple[float, float] = MultiCropSpec.blur_sigma  # in pixels (small images: less)
    mask_ratio: tuple[float, float] = (0.3, 0.3)  # iBOT's mix: (0.1, 0.5) with mask_prob 0.5
    mask_prob: float = 1.0
    # workers: DataLoader workers decode and augment each image (the reference path).
    # device: workers only read (files: bytes); decoding, crops, photometric ops and masks run in batches
    # on the training device (the CPU when it trains on the CPU).
    augment_on: AugmentOn = "workers"
    num_workers: int = 8
    limit: int | None = None  # use only the first N images (smoke tests)

    def crop_spec(self) -> MultiCropSpec:
        """The multi-crop augmentation these fields describe (photometric settings: iBOT's)."""
        return MultiCropSpec(
            global_size=self.global_size,
            local_size=self.local_size,
            n_locals=self.n_locals,
            global_scale=self.global_scale,
            local_scale=self.local_scale,
            in_chans=self.in_chans,
            blur_sigma=self.blur_sigma,
        )

    def validate(self) -> None:
        self.crop_spec()
        check(self.local_size <= self.global_size, "local_size", "must be <= global_size")
        lo, hi = self.mask_ratio
        check(0.0 <= lo <= hi <= 1.0, "mask_ratio", f"must be an interval within [0, 1], got ({lo}, {hi})")
        check(0.0 <= self.mask_prob <= 1.0, "mask_prob", "must be in [0, 1]")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or null")
        check(
            self.path is not None or self.dataset not in ("folder", "imagenet"),
            "path",
            f"is required for dataset '{self.dataset}' (the image folder to pre-train on)",
        )


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
    compile: bool = False
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

    def validate(self) -> None:
        check(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")
        check(self.log_every > 0, "log_every", "must be > 0")
        check(self.knn_every >= 0, "knn_every", "must be >= 0")
        check(
            self.knn_every == 0 or self.knn_dataset is not None,
            "knn_dataset",
            "is required when knn_every > 0",
        )


@dataclass
class PretrainConfig:
    method: Method = "sop"  # sop: the paper's; ibot, dino: the baselines it compares with
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sop: SOPConfig = field(default_factory=SOPConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def method_config(self) -> SOPConfig | IBOTConfig | DINOConfig:
        """The section of the method that runs (``sop``, ``ibot`` or ``dino``)."""
        section: SOPConfig | IBOTConfig | DINOConfig = getattr(self, self.method)
        return section

    def validate(self) -> None:
        if self.method == "sop":  # the other methods' sections validate themselves
            self._validate_sop()

    def _validate_sop(self) -> None:
        s = self.sop
        check(s.dim == self.model.head_bottleneck_dim, "sop.dim", "must equal model.head_bottleneck_dim")
        for bank, anchors, k, keep in (
            ("cls", s.cls_anchors, s.cls_k, s.cls_keep_fraction),
            ("patch", s.patch_anchors, s.patch_k, s.patch_keep_fraction),
        ):
            size = getattr(s, f"{bank}_bank_size")
            check(size > 0, f"sop.{bank}_bank_size", "must be > 0")
            check(0 < anchors <= size, f"sop.{bank}_anchors", f"must be in [1, sop.{bank}_bank_size={size}]")
            check(
                0 <= k < size - anchors + 1, f"sop.{bank}_k", f"must be < {bank}_bank_size - {bank}_anchors"
            )
            check(0 < keep <= 1, f"sop.{bank}_keep_fraction", "must be in (0, 1]")
            check(round(keep * anchors) >= 2, f"sop.{bank}_anchors", "anchors x keep_fraction must keep >= 2")
        check(s.cls_tasks >= 1, "sop.cls_tasks", "must be >= 1")
        check(0 <= s.smoothing < 1, "sop.smoothing", "must be in [0, 1)")
        check(s.student_temp > 0, "sop.student_temp", "must be > 0")
        check(
            s.anchor_selection in ("uniform", "low_cv"), "sop.anchor_selection", "must be uniform or low_cv"
        )
        for bank, k, keep in (
            ("cls", s.cls_k, s.cls_keep_fraction),
            ("patch", s.patch_k, s.patch_keep_fraction),
        ):
            check(
                s.anchor_selection != "low_cv" or k >= 2 or keep == 1,
                f"sop.{bank}_k",
                f"low_cv anchor selection needs k >= 2 (or sop.{bank}_keep_fraction=1: nothing to select)",
            )


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
