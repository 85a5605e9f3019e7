"""Evaluation protocols by name: each is ``run(backbone, cfg) -> dict[str, float]`` with a typed config.

A protocol registered with ``needs_head=True`` receives the teacher :class:`~sopvit.models.Encoder`
(backbone + projection head) of a training checkpoint instead of the backbone alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sopvit.models import Backbone, Encoder

RunFn = Callable[[Backbone, Any], dict[str, float]]
HeadRunFn = Callable[[Encoder, Any], dict[str, float]]
F = TypeVar("F", bound=Callable[..., dict[str, float]])  # a RunFn or a HeadRunFn


@dataclass(frozen=True)
class Evaluator:
    name: str
    config: type  # a dataclass; `sopvit eval NAME` loads it from YAML + dotted overrides
    run: Callable[..., dict[str, float]]  # RunFn, or HeadRunFn when needs_head
    summary: str
    needs_head: bool = False  # run receives the teacher Encoder (backbone + projection head)


REGISTRY: dict[str, Evaluator] = {}


def register(name: str, config: type, summary: str, needs_head: bool = False) -> Callable[[F], F]:
    """Decorator: ``@register("knn", KNNConfig, "weighted k-NN")`` above ``def run(backbone, cfg)``;
    with ``needs_head=True`` above ``def run(encoder, cfg)``."""

    def add(run: F) -> F:
        if name in REGISTRY:
            raise ValueError(f"evaluator {name!r} is registered twice")
        REGISTRY[name] = Evaluator(name, config, run, summary, needs_head)
        return run

    return add


def get_evaluator(name: str) -> Evaluator:
    if name not in REGISTRY:
        raise ValueError(f"unknown evaluation {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
