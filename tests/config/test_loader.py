"""Loading recipes: defaults, YAML merge, file errors, validation, save/load round trip and headers."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sopvit.config import ConfigError, config_to_dict, load_config, recipe_header, save_config
from tests.config.example_schema import Head, Optim, Root, raises, write


def test_defaults_without_file_or_overrides() -> None:
    assert load_config(Root) == Root()


def test_yaml_merges_nested_sections_and_keeps_other_defaults(tmp_path: Path) -> None:
    recipe = "seed: 3\ntrain:\n  optim: {lr: 1e-4, betas: [0.8, 0.9]}\n  sizes: [32]\nhead: {}\n"
    path = write(tmp_path, recipe)
    cfg = load_config(Root, path)
    assert cfg.seed == 3 and cfg.train.batch_size == 64 and cfg.train.sizes == (32,)
    assert cfg.train.optim == Optim(lr=1e-4, betas=(0.8, 0.9))
    assert cfg.head == Head()


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(Root, write(tmp_path, "# only a comment\n")) == Root()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 1\ntrian: {}\n", "unknown key 'trian' (did you mean 'train'?)"),
        ("train:\n  optim:\n    lrr: 1\n", "unknown key 'train.optim.lrr' (did you mean 'train.optim.lr'?)"),
        ("train:\n  batch_size: 1.5\n", "train.batch_size: expected an int, got 1.5"),
        ("train: 3\n", "train: expected a mapping, got 3"),
        ("- 1\n- 2\n", "the top level must be a mapping of keys, got list"),
        ("seed: 1\ntrain: [1\n", "recipe.yaml:3: invalid YAML"),
        ("train:\n  name: a\n bad: 1\n", "recipe.yaml:3: invalid YAML"),
        ("seed: 1\ntrain:\n  amp: true\n  amp: false\n", "recipe.yaml:4: invalid YAML (duplicate key 'amp')"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    with raises(message):
        load_config(Root, write(tmp_path, text))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with raises(f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_config(Root, tmp_path / "nope.yaml")


def test_validation_runs_innermost_first_and_prefixes_the_section() -> None:
    with raises("train.optim.lr: must be > 0"):
        load_config(Root, overrides=["train.optim.lr=-1", "train.batch_size=0"])
    with raises("train.batch_size: must be > 0"):
        load_config(Root, overrides=["train.batch_size=0"])
    with raises("train.crops: needs exactly (min, max)"):
        load_config(Root, overrides=["train.crops=[1.0]"])


def test_error_is_a_value_error_with_structured_key() -> None:
    with pytest.raises(ValueError) as info:
        load_config(Root, overrides=["train.optim.lr=0"])
    assert isinstance(info.value, ConfigError)
    assert (info.value.key, info.value.message) == ("train.optim.lr", "must be > 0")
    assert str(pickle.loads(pickle.dumps(info.value))) == "train.optim.lr: must be > 0"


@dataclass
class Required:
    size: int
    extra: list[int] = field(default_factory=list)


def test_required_fields_must_come_from_the_file(tmp_path: Path) -> None:
    with raises("missing required key 'size'"):
        load_config(Required)
    assert load_config(Required, write(tmp_path, "size: 3\n")) == Required(size=3)


@dataclass
class Unsupported:
    blob: object = None


def test_unsupported_annotation_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"Unsupported\.blob: unsupported config annotation"):
        load_config(Unsupported)


def test_save_load_round_trip_with_header(tmp_path: Path) -> None:
    cfg = load_config(Root, overrides=["train.optim.lr=3e-4", "train.init=a/b.pt", "head.note=hi"])
    plain = config_to_dict(cfg)
    assert plain["train"]["sizes"] == [224, 96] and plain["train"]["init"] == "a/b.pt"
    assert json.loads(json.dumps(plain)) == plain
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path, header="command: sopvit pretrain\n\nexpected: 70.1")
    assert load_config(Root, path) == cfg
    assert recipe_header(path) == "command: sopvit pretrain\n\nexpected: 70.1"
    assert not list(path.parent.glob("*.tmp"))


def test_recipe_header_stops_at_the_first_key(tmp_path: Path) -> None:
    path = write(tmp_path, "\n# Recipe: tiny\n#   hardware: 1 GPU\n#\n# score: 50\nseed: 1  # not header\n")
    assert recipe_header(path) == "Recipe: tiny\n  hardware: 1 GPU\n\nscore: 50"
    assert recipe_header(write(tmp_path, "seed: 1\n", "bare.yaml")) == ""
