"""Every recipe in configs/ loads, validates, names a known architecture and documents itself."""

import re
from pathlib import Path

import pytest

from sopvit.config import load_config, recipe_header
from sopvit.eval import get_evaluator, load_protocols
from sopvit.models import ARCHS
from sopvit.recipe.config import pretrain_config_type

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml"))


def test_there_are_recipes() -> None:
    names = {p.stem for p in RECIPES}
    assert {
        "fashion_mnist_cpu",
        "vit_small_in1k",
        "vit_base_in1k",
        "vit_large_in1k",
        "swin_tiny_in1k",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_documents_itself(path: Path) -> None:
    cfg = load_config(pretrain_config_type(), path, ["data.path=/data/imagenet"])
    assert cfg.model.arch in ARCHS
    header = recipe_header(path)
    for field in ("command:", "hardware:", "time:", "expected:"):
        assert field in header, f"{path.name} header lacks '{field}'"


EVAL_RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=[p.stem for p in EVAL_RECIPES])
def test_eval_recipe_loads_for_the_protocol_its_command_names(path: Path) -> None:
    header = recipe_header(path)
    for field in ("command:", "hardware:", "time:", "expected:"):
        assert field in header, f"{path.name} header lacks '{field}'"
    name = re.search(r"sopvit eval (\w+) --config configs/eval/" + re.escape(path.name), header)
    assert name, f"{path.name}: the command line must run this recipe"
    load_protocols()
    cfg = load_config(get_evaluator(name.group(1)).config, path, [])
    cfg.validate()
