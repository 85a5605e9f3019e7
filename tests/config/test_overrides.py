"""Dotted ``key=value`` overrides: every field type, error messages, ordering and a round-trip property."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sopvit.config import ConfigError, apply_overrides, load_config, save_config
from tests.config.example_schema import Head, Optim, Root, raises, write


@pytest.mark.parametrize(
    ("override", "attr", "expected"),
    [
        ("seed=7", "seed", 7),
        ("train.optim.lr=1e-3", "train.optim.lr", 1e-3),
        ("train.optim.lr=2", "train.optim.lr", 2.0),
        ("train.optim.betas=[0.5, 0.6]", "train.optim.betas", (0.5, 0.6)),
        ("train.optim.schedule=linear", "train.optim.schedule", "linear"),
        ("train.optim.warmup=null", "train.optim.warmup", None),
        ("train.optim.warmup=10", "train.optim.warmup", 10),
        ("train.amp=false", "train.amp", False),
        ("train.amp='true'", "train.amp", True),
        ("train.name=yes", "train.name", "yes"),
        ("train.name=123", "train.name", "123"),
        ("train.name=", "train.name", ""),
        ("train.name=[x", "train.name", "[x"),
        ("train.name=a: b", "train.name", "a: b"),
        ("train.crops=[0.1, 1]", "train.crops", [0.1, 1.0]),
        ("train.sizes=[1, 2, 3]", "train.sizes", (1, 2, 3)),
        ("train.out_dir=/tmp/x", "train.out_dir", Path("/tmp/x")),
        ("train.init=ckpt.pt", "train.init", Path("ckpt.pt")),
        ("train.weights.patch=0.5", "train.weights", {"cls": 1.0, "patch": 0.5}),
        ("train.weights={a: 2}", "train.weights", {"a": 2.0}),
        ("train.optim={lr: 0.5}", "train.optim", Optim(lr=0.5)),
        ("head.dim=128", "head", Head(dim=128)),
        ("head={note: 'x'}", "head", Head(note="x")),
    ],
)
def test_dotted_overrides(override: str, attr: str, expected: object) -> None:
    value: Any = load_config(Root, overrides=[override])
    for name in attr.split("."):
        value = getattr(value, name)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_in_order_after_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\n")
    assert load_config(Root, path, ["seed=2", "seed=3"]).seed == 3


def test_apply_overrides_returns_a_new_validated_config() -> None:
    cfg = Root()
    new = apply_overrides(cfg, ["train.batch_size=16"])
    assert new.train.batch_size == 16 and cfg.train.batch_size == 64
    with raises("train.batch_size: must be a multiple of 8"):
        apply_overrides(new, ["train.batch_size=12"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.optim.lr=abc", "train.optim.lr: expected a float, got 'abc'"),
        ("seed=1.5", "seed: expected an int, got 1.5"),
        ("seed=3.0", "seed: expected an int, got 3.0"),
        ("seed=true", "seed: expected an int, got True"),
        ("train.optim.lr=true", "train.optim.lr: expected a float, got True"),
        ("train.amp=1", "train.amp: expected a bool, got 1"),
        ("train.amp=maybe", "train.amp: expected a bool, got 'maybe'"),
        ("train.optim.schedule=step", "train.optim.schedule: expected one of 'cosine', 'linear', got 'step'"),
        ("train.optim.betas=[0.1]", "train.optim.betas: expected a list of 2 items, got [0.1]"),
        ("train.crops=[0.1, x]", "train.crops[1]: expected a float, got 'x'"),
        ("train.sizes=5", "train.sizes: expected a list, got 5"),
        ("train.weights.cls=big", "train.weights.cls: expected a float, got 'big'"),
        ("train.optim=3", "train.optim: expected a mapping, got 3"),
        ("train.batch_sise=8", "unknown key 'train.batch_sise' (did you mean 'train.batch_size'?)"),
        ("train.optim.lrr=1", "unknown key 'train.optim.lrr' (did you mean 'train.optim.lr'?)"),
        ("train.zzz=1", "unknown key 'train.zzz' (valid keys: batch_size, amp,"),
        ("train.optim.lr.x=1", "train.optim.lr: has no sub-key 'x'"),
        ("seed", "invalid override 'seed': expected dotted.key=value"),
        ("train..lr=1", "invalid override 'train..lr=1'"),
        ("=1", "invalid override '=1'"),
        ("train.crops=[1,", "train.crops: cannot parse '[1,' as YAML"),
        ("train.weights={a: 1, a: 2}", "train.weights: cannot parse '{a: 1, a: 2}' as YAML (duplicate key"),
    ],
)
def test_override_errors_name_the_key(override: str, message: str) -> None:
    with raises(message):
        load_config(Root, overrides=[override])


def test_overrides_must_be_a_sequence_not_one_string() -> None:
    with pytest.raises(TypeError, match="not a single string"):
        load_config(Root, overrides="seed=1")


def test_error_messages_are_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Root, overrides=["train.name=[1, 2]", "train.crops=[1, {a: b}]"])
    assert "\n" not in str(info.value)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "seed": st.integers(-(2**40), 2**40),
    "train.optim.lr": finite.filter(lambda x: x > 0),
    "train.optim.betas": st.tuples(finite, finite),
    "train.optim.schedule": st.sampled_from(["cosine", "linear"]),
    "train.optim.warmup": st.none() | st.integers(0, 10**6),
    "train.amp": st.booleans(),
    "train.name": text,
    "train.crops": st.lists(finite, min_size=2, max_size=2),
    "train.sizes": st.lists(st.integers(1, 4096), max_size=4).map(tuple),
    "train.out_dir": text.filter(bool).map(Path),
    "head.note": st.none() | text,
}


def as_override_text(value: Any) -> str:
    """YAML flow text for ``value``; floats via repr exercise the ``1e-05`` string path."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(as_override_text(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value) if isinstance(value, Path) else value)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_valid_overrides_round_trip(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    keys = data.draw(st.lists(st.sampled_from(sorted(VALUES)), unique=True, min_size=1))
    values = {key: data.draw(VALUES[key], label=key) for key in keys}
    cfg = load_config(Root, overrides=[f"{key}={as_override_text(v)}" for key, v in values.items()])
    for key, expected in values.items():
        got: Any = cfg
        for name in key.split("."):
            got = getattr(got, name)
        assert got == expected
    path = tmp_path_factory.mktemp("rt") / "cfg.yaml"
    save_config(cfg, path)
    assert load_config(Root, path) == cfg
    assert apply_overrides(cfg, []) == cfg
