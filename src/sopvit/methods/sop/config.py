"""SOP's config section (``sop:`` in a pre-training recipe) and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from sopvit.config.coerce import ConfigError, check
from sopvit.methods.sop.prototypes import AnchorSelection


@dataclass
class SOPConfig:
    """Hyper-parameters of the objective; defaults are the reference code's (docs/method.md)."""

    dim: int | None = None  # width of the head outputs; None: model.head_bottleneck_dim
    cls_bank_size: int = 65536
    patch_bank_size: int = 8192
    cls_tasks: int = 4
    cls_anchors: int = 64
    cls_k: int = 8
    cls_keep_fraction: float = 0.5
    patch_anchors: int = 512
    patch_k: int = 0
    patch_keep_fraction: float = 1.0
    smoothing: float = 0.1
    student_temp: float = 0.1
    anchor_selection: AnchorSelection = "uniform"
    patch_loss_weight: float = 1.0
    koleo_weight: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        for bank, anchors, k, keep in (
            ("cls", self.cls_anchors, self.cls_k, self.cls_keep_fraction),
            ("patch", self.patch_anchors, self.patch_k, self.patch_keep_fraction),
        ):
            size = getattr(self, f"{bank}_bank_size")
            check(size > 0, f"{bank}_bank_size", "must be > 0")
            check(0 < anchors <= size, f"{bank}_anchors", f"must be in [1, sop.{bank}_bank_size={size}]")
            check(0 <= k < size - anchors + 1, f"{bank}_k", f"must be < {bank}_bank_size - {bank}_anchors")
            check(0 < keep <= 1, f"{bank}_keep_fraction", "must be in (0, 1]")
            check(round(keep * anchors) >= 2, f"{bank}_anchors", "anchors x keep_fraction must keep >= 2")
        check(self.cls_tasks >= 1, "cls_tasks", "must be >= 1")
        check(0 <= self.smoothing < 1, "smoothing", "must be in [0, 1)")
        check(self.student_temp > 0, "student_temp", "must be > 0")
        check(self.anchor_selection in ("uniform", "low_cv"), "anchor_selection", "must be uniform or low_cv")
        for bank, k, keep in (
            ("cls", self.cls_k, self.cls_keep_fraction),
            ("patch", self.patch_k, self.patch_keep_fraction),
        ):
            check(
                self.anchor_selection != "low_cv" or k >= 2 or keep == 1,
                f"{bank}_k",
                f"low_cv anchor selection needs k >= 2 (or sop.{bank}_keep_fraction=1: nothing to select)",
            )


def check_head(cfg: SOPConfig, head_dim: int) -> None:
    """The memories hold head outputs: ``sop.dim``, when given, must be the head's output width."""
    if cfg.dim is not None and cfg.dim != head_dim:
        raise ConfigError(
            f"{cfg.dim} differs from model.head_bottleneck_dim={head_dim} (the head's output width): drop "
            f"sop.dim, which follows the head, or set model.head_bottleneck_dim={cfg.dim}",
            "sop.dim",
        )
