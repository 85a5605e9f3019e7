"""Student and teacher encoders as a pre-training config describes them."""

from __future__ import annotations

from sopvit.baselines.config import DINOConfig
from sopvit.config import ConfigError
from sopvit.config.pretrain import PretrainConfig
from sopvit.models.student_teacher import StudentTeacher


def build_model(cfg: PretrainConfig) -> StudentTeacher:
    """Student and teacher encoders for ``cfg.model`` at the global crop size of ``cfg.data``."""
    m = cfg.model
    arch_overrides = {
        k: v
        for k, v in (
            ("patch_size", m.patch_size),
            ("embed_dim", m.embed_dim),
            ("depth", m.depth),
            ("num_heads", m.num_heads),
        )
        if v is not None
    }
    try:
        return _create(cfg, arch_overrides)
    except AssertionError as err:  # timm validates sizes with asserts
        raise ConfigError(f"timm cannot build {m.arch} with {arch_overrides}: {err}", "model") from err


def _create(cfg: PretrainConfig, arch_overrides: dict[str, int]) -> StudentTeacher:
    m, method = cfg.model, cfg.method_config
    # iBOT and DINO end the head with learnable prototypes; SOP's prototypes come from its memories.
    prototypes = method if isinstance(method, DINOConfig) else None
    return StudentTeacher.create(
        m.arch,
        cfg.data.global_size,
        cfg.data.in_chans,
        m.drop_path_rate,
        m.head_hidden_dim,
        m.head_bottleneck_dim,
        m.head_layers,
        head_prototypes=prototypes.out_dim if prototypes else None,
        norm_last_layer=prototypes.norm_last_layer if prototypes else True,
        **arch_overrides,
    )
