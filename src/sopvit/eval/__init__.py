"""Evaluation protocols of the paper, each ``run(backbone, cfg) -> dict[str, float]``, registered by name
(``semisup`` receives the teacher encoder with its projection head: ``Evaluator.needs_head``)."""

import importlib

from sopvit.eval.registry import REGISTRY, Evaluator, get_evaluator, register

# Importing a protocol's module registers it; the list is the suite.
PROTOCOL_MODULES = (
    "knn",
    "linear",
    "logreg",
    "finetune",
    "retrieval",
    "davis",
    "robustness",
    "copydays",
    "semisup",
)


def load_protocols() -> dict[str, Evaluator]:
    for module in PROTOCOL_MODULES:
        importlib.import_module(f"sopvit.eval.{module}")
    return REGISTRY


__all__ = ["REGISTRY", "Evaluator", "get_evaluator", "load_protocols", "register"]
