"""``method: NAME`` -> its :class:`MethodSpec`. One row per objective; adding an objective adds a row.

``register`` also takes rows from outside the package (a plug-in, a test): the pre-training config then
has a section of that name, and every command (pretrain, resume, export, eval, visualize, bench) runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sopvit.methods.dino import DINOConfig, DINOObjective, frozen_prototypes, learned_head
from sopvit.methods.ibot import IBOTConfig, IBOTObjective
from sopvit.methods.interface import MethodSpec, Objective
from sopvit.methods.sop.config import SOPConfig, check_head
from sopvit.methods.sop.objective import SOPObjective

_REGISTRY: dict[str, MethodSpec] = {}
# the method's section becomes an attribute of the pre-training config beside these
_TAKEN = ("method", "model", "data", "train", "run", "spec", "method_config", "validate")


def register(spec: MethodSpec) -> MethodSpec:
    """Add (or replace) the row of ``spec.name``; returns ``spec``."""
    if not spec.name.isidentifier() or spec.name in _TAKEN:
        raise ValueError(
            f"method name {spec.name!r} must be an identifier other than {', '.join(_TAKEN)} (the "
            "pre-training config's own sections and attributes)"
        )
    if not dataclasses.is_dataclass(spec.config):
        raise TypeError(f"method {spec.name!r}: config must be a dataclass type, got {spec.config!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}") from None


def _sop(cfg: SOPConfig, dim: int) -> Objective:
    return SOPObjective(dataclasses.replace(cfg, dim=dim))


def _ibot(cfg: Any, dim: int) -> Objective:
    return IBOTObjective(cfg)


def _dino(cfg: Any, dim: int) -> Objective:
    return DINOObjective(cfg)


register(
    MethodSpec(
        "sop",
        "SOP",
        SOPConfig,
        _sop,
        shape_keys=("cls_bank_size", "patch_bank_size"),
        gallery="memory",
        check_head=check_head,
    )
)
register(
    MethodSpec(
        "ibot",
        "iBOT",
        IBOTConfig,
        _ibot,
        head=learned_head,
        frozen=frozen_prototypes,
        shape_keys=("out_dim",),
        gallery="head",
    )
)
register(
    MethodSpec(
        "dino",
        "DINO",
        DINOConfig,
        _dino,
        head=learned_head,
        frozen=frozen_prototypes,
        shape_keys=("out_dim",),
        gallery="head",
    )
)
