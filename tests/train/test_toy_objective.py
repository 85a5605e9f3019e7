"""A fourth objective, defined and registered in this file alone, runs through every command: adding an
objective is one module, one registry row and one recipe, and nothing else in src/."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sopvit.config import ConfigError, check
from sopvit.export import export, load_pretrained
from sopvit.methods import (
    MethodSpec,
    ScheduleValues,
    StudentOutputs,
    TeacherOutputs,
    TokenPlan,
    register,
    unregister,
)
from sopvit.recipe import load_pretrain_config
from sopvit.train.trainer import Trainer
from sopvit.visualize import prototype_gallery
from tests.train.tiny import TINY


@dataclass
class ToyConfig:
    """A BYOL-like toy: each global view's [CLS] output predicts the other view's teacher output."""

    weight: float = 1.0
    momentum: float = 0.9  # of the running mean of teacher outputs kept as state

    def validate(self) -> None:
        check(self.weight > 0, "weight", "must be > 0")


class ToyObjective(nn.Module):
    masks_student = False

    def __init__(self, cfg: ToyConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.mean: torch.Tensor
        self.register_buffer("mean", torch.zeros(dim))

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        return TokenPlan(teacher=torch.zeros_like(masks))  # [CLS] only

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = teacher.cls.shape[0]
        s = F.normalize(student.cls[:n].float(), dim=-1)
        t = F.normalize((teacher.cls.float() - self.mean).roll(n // 2, dims=0), dim=-1)
        loss = self.cfg.weight * (2 - 2 * (s * t.detach()).sum(-1)).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def after_update(self, teachers: Sequence[TeacherOutputs]) -> None:
        m = self.cfg.momentum
        self.mean.mul_(m).add_(torch.cat([t.cls.float() for t in teachers]).mean(0), alpha=1 - m)


TOY = MethodSpec("toy", "Toy", ToyConfig, lambda cfg, dim: ToyObjective(cfg, dim))

RECIPE = """\
# command: sopvit pretrain --config toy.yaml (a test recipe: a tiny ViT, Fashion-MNIST, 3 steps on a CPU)
method: toy
toy:
  weight: 0.5
"""


@pytest.fixture
def toy() -> Iterator[MethodSpec]:
    register(TOY)
    yield TOY
    unregister(TOY.name)


def _config(tmp_path: Path, run: str, *overrides: str) -> object:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    return load_pretrain_config(
        recipe, [*TINY, "data.limit=64", f"run.output_dir={tmp_path / run}", *overrides]
    )


def test_a_registered_toy_objective_pretrains_resumes_exports_and_says_it_has_no_gallery(
    toy: MethodSpec, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, "whole", "train.max_steps=4")
    assert cfg.method == "toy" and cfg.method_config == ToyConfig(weight=0.5)  # type: ignore[attr-defined]
    whole = Trainer(cfg)  # type: ignore[arg-type]
    assert isinstance(whole.objective, ToyObjective) and whole.ctx.frozen == {}
    whole.fit()

    Trainer(_config(tmp_path, "split", "train.max_steps=3")).fit()  # type: ignore[arg-type]
    resumed = Trainer(_config(tmp_path, "split", "train.max_steps=4"))  # type: ignore[arg-type]
    assert resumed.step == 3
    assert not torch.equal(resumed.objective.mean, torch.zeros_like(resumed.objective.mean))
    resumed.fit()
    # the objective's state is checkpointed with the run: the resumed run equals the uninterrupted one
    assert torch.equal(resumed.objective.mean, whole.objective.mean)
    for a, b in zip(resumed.model.teacher.parameters(), whole.model.teacher.parameters(), strict=True):
        assert torch.equal(a, b)

    out = export(tmp_path / "split", "safetensors", tmp_path / "exported")
    backbone = load_pretrained(str(out))
    x = torch.randn(2, 1, 16, 16)
    expected = whole.model.teacher.backbone.eval()
    with torch.no_grad():
        assert torch.allclose(backbone.eval().forward_features(x), expected.forward_features(x), atol=1e-6)

    with pytest.raises(ValueError, match="Toy has no prototypes to draw"):
        prototype_gallery(tmp_path / "split", tmp_path / "gallery.png")


def test_a_toy_section_is_checked_like_the_built_in_ones(toy: MethodSpec, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"toy\.weight: must be > 0"):
        _config(tmp_path, "bad", "toy.weight=0")
    with pytest.raises(ConfigError, match=r"unknown key 'toy\.wieght'"):
        _config(tmp_path, "typo", "toy.wieght=1")


def test_an_unregistered_method_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method: must be one of 'sop', 'ibot', 'dino', got 'toy'"):
        load_pretrain_config(None, [*TINY, "method=toy"])


@pytest.mark.parametrize("name", ["data", "spec", "not-an-identifier"])
def test_a_method_name_that_would_shadow_the_config_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"method name '{name}' must be an identifier other than"):
        register(MethodSpec(name, "X", ToyConfig, lambda cfg, dim: ToyObjective(cfg, dim)))
