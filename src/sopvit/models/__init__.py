"""Backbones (timm ViT/Swin with a mask token), projection head and student/teacher encoders."""

from sopvit.models.backbone import Backbone
from sopvit.models.build import build_student_teacher
from sopvit.models.config import ModelConfig
from sopvit.models.factory import (
    ARCHS,
    ArchSpec,
    available_archs,
    create_backbone,
    describe_archs,
    get_arch_spec,
    resolve_timm_kwargs,
)
from sopvit.models.head import ProjectionHead
from sopvit.models.student_teacher import Encoder, StudentTeacher

__all__ = [
    "ARCHS",
    "ArchSpec",
    "Backbone",
    "Encoder",
    "ModelConfig",
    "ProjectionHead",
    "StudentTeacher",
    "available_archs",
    "build_student_teacher",
    "create_backbone",
    "describe_archs",
    "get_arch_spec",
    "resolve_timm_kwargs",
]
