"""A small schema exercising every supported annotation, shared by the config tests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from sopvit.config import ConfigError, check


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear"] = "cosine"
    warmup: int | None = None

    def validate(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")


@dataclass
class Train:
    batch_size: int = 64
    amp: bool = True
    name: str = "run"
    crops: list[float] = field(default_factory=lambda: [0.25, 1.0])
    sizes: tuple[int, ...] = (224, 96)
    out_dir: Path = Path("runs")
    init: Path | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"cls": 1.0})
    optim: Optim = field(default_factory=Optim)

    def validate(self) -> None:
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(len(self.crops) == 2, "crops", "needs exactly (min, max)")


@dataclass
class Head:
    dim: int = 256
    note: str | None = None


@dataclass
class Root:
    seed: int = 0
    train: Train = field(default_factory=Train)
    head: Head | None = None

    def validate(self) -> None:
        check(self.train.batch_size % 8 == 0, "train.batch_size", "must be a multiple of 8")


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def raises(message: str) -> Any:
    return pytest.raises(ConfigError, match=re.escape(message))
