"""The ``model:`` section of a pre-training config: backbone and projection head."""

from __future__ import annotations

from dataclasses import dataclass

from sopvit.config.coerce import check


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
