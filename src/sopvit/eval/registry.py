"""Evaluation protocols by name: each is ``run(backbone, cfg) -> dict[str, float]`` with a typed config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sopvit.models import Backbone

RunFn = Callable[[Backbone, Any], dict[str, float]]


@dataclass(frozen=True)
class Evaluator:
    name: str
    config: type  # a dataclass; `sopvit eval NAME` loads it from YAML + dotted overrides
    run: RunFn
    summary: str


REGISTRY: dict[str, Evaluator] = {}


def register(name: str, config: type, summary: str) -> Callable[[RunFn], RunFn]:
    """Decorator: ``@register("knn", KNNConfig, "weighted k-NN")`` above ``def run(backbone, cfg)``."""

    def add(run: RunFn) -> RunFn:
        if name in REGISTRY:
            raise ValueError(f"evaluator {name!r} is registered twice")
        REGISTRY[name] = Evaluator(name, config, run, summary)
        return run

    return add


def get_evaluator(name: str) -> Evaluator:
    if name not in REGISTRY:
        raise ValueError(f"unknown evaluation {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
