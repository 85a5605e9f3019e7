"""Student and teacher encoders as a ``model:`` section describes them."""

from __future__ import annotations

from sopvit.config import ConfigError
from sopvit.models.config import ModelConfig
from sopvit.models.student_teacher import StudentTeacher


def build_student_teacher(
    m: ModelConfig,
    image_size: int,
    in_chans: int,
    head_prototypes: int | None = None,
    norm_last_layer: bool = True,
) -> StudentTeacher:
    """Student and teacher for ``m`` at ``image_size``; ``head_prototypes``: a learnable prototype layer
    of that width ends the head (iBOT, DINO), None: the head ends at its bottleneck (SOP)."""
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
        return StudentTeacher.create(
            m.arch,
            image_size,
            in_chans,
            m.drop_path_rate,
            m.head_hidden_dim,
            m.head_bottleneck_dim,
            m.head_layers,
            head_prototypes=head_prototypes,
            norm_last_layer=norm_last_layer,
            **arch_overrides,
        )
    except AssertionError as err:  # timm validates sizes with asserts
        raise ConfigError(f"timm cannot build {m.arch} with {arch_overrides}: {err}", "model") from err
