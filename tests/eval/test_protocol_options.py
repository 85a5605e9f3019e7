"""Every config field of every evaluation protocol, each in a test where a wrong value changes a number.

Each protocol has a table of ``Row``s (field, alternative value, check). A check predicts the exact
result of the alternative (from a reference implementation, or a hand-derived value), asserts that the
result moves away from the base run, asserts that a field which must not matter (extraction batch,
workers, cache, device) leaves the numbers unchanged, or that a wrong value is refused. This module
holds the machinery and ``test_every_config_field_has_a_row``, which fails when a config gains a field
that no table lists; the tables are in ``test_protocol_options_frozen.py`` (k-NN, linear, logreg,
robustness), ``test_protocol_options_finetune.py``, ``test_protocol_options_semisup.py`` and
``test_protocol_options_dense.py`` (retrieval, DAVIS, Copydays).

Where a protocol's output is too coarse to tell two values apart (a top-1 on 40 images), runs are also
observed through spies on the module-level functions ``run`` calls; the spies call the real ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.eval import load_protocols
from sopvit.models import Backbone, create_backbone

# ImageNet statistics averaged over channels: what a 1-channel evaluation must standardise with
GREY_MEAN, GREY_STD = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3

Obs = dict[str, Any]  # what a run is judged by; keys starting with "_" are not numbers to compare


# ------------------------------------------------------------------------------------ table machinery
@dataclass(frozen=True)
class Row:
    """Set ``field`` to ``value`` on top of the scenario's base and ``also``; ``check`` judges the run."""

    field: str
    value: Any
    check: Callable[[Scenario, Row], None]
    also: tuple[tuple[str, Any], ...] = ()

    @property
    def overrides(self) -> dict[str, Any]:
        return {**dict(self.also), self.field: self.value}

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.also)
        return f"{self.field}={self.value}" + (f"[{extra}]" if extra else "")


class Scenario:
    """A base config, a backbone and a way to observe one run; observations are cached per overrides."""

    def __init__(self, base: Any, observe: Callable[[Any], Obs], backbone: Any, tmp: Path) -> None:
        self.base, self._observe, self.backbone, self.tmp = base, observe, backbone, tmp
        self._cache: dict[str, Obs] = {}

    def cfg(self, **overrides: Any) -> Any:
        # tables are written before tmp exists: "{tmp}" in a value names a folder of this scenario
        resolved = {k: v.format(tmp=self.tmp) if isinstance(v, str) else v for k, v in overrides.items()}
        return replace(self.base, **resolved)

    def observe(self, fresh: bool = False, **overrides: Any) -> Obs:
        key = repr(sorted(overrides.items()))
        if fresh:
            return self._observe(self.cfg(**overrides))
        if key not in self._cache:
            self._cache[key] = self._observe(self.cfg(**overrides))
        return self._cache[key]

    def alt(self, row: Row) -> Obs:
        return self.observe(**row.overrides)

    def ref(self, row: Row) -> Obs:
        """The run a row is compared with: the same scenario without the field."""
        return self.observe(**dict(row.also))


Check = Callable[[Scenario, Row], None]


def close(a: Any, b: Any, atol: float = 1e-5) -> bool:
    """Equal up to ``atol``, through dicts, sequences and tensors."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=0))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=atol)
    return bool(a == b)


def same(*keys: str, atol: float = 1e-5) -> Check:
    """The field must not matter: the observed ``keys`` (default: all) equal the base run's."""

    def check(sc: Scenario, row: Row) -> None:
        alt, ref = sc.alt(row), sc.ref(row)
        for k in keys or [k for k in ref if not k.startswith("_")]:
            assert close(alt[k], ref[k], atol), f"{row} changed {k}: {alt[k]} vs {ref[k]}"

    return check


def same_on_cpu(sc: Scenario, row: Row) -> None:
    """device="auto" must be the CPU here and give the CPU's numbers exactly."""
    if torch.cuda.is_available():
        pytest.skip("device=auto picks CUDA on this host, whose bf16 numbers may differ")
    same(atol=0.0)(sc, row)


def differs(key: str = "out") -> Check:
    """The observed ``key`` moves away from the base run, so a value that is ignored would be seen."""

    def check(sc: Scenario, row: Row) -> None:
        assert not close(sc.alt(row)[key], sc.ref(row)[key], atol=1e-7), f"{row} left {key} unchanged"

    return check


def raises(exc: type[Exception] | tuple[type[Exception], ...], match: str) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        with pytest.raises(exc, match=match):
            sc.alt(row)

    return check


def every(*checks: Check) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        for c in checks:
            c(sc, row)

    return check


def reproducible(sc: Scenario, row: Row) -> None:
    """A second run with the same seed gives the same numbers (the row's value draws random numbers)."""
    again, first = sc.observe(fresh=True, **row.overrides), sc.alt(row)
    assert all(close(again[k], first[k], atol=0.0) for k in first if not k.startswith("_"))


def cache_used(sc: Scenario, row: Row) -> None:
    """cache_dir must not change the numbers, cold or warm, and must really hold the features."""
    same()(sc, row)
    assert list(Path(sc.cfg(**row.overrides).cache_dir).glob("features-*.pt")), "nothing was cached"
    reproducible(sc, row)  # the warm run reads the files


def spy(mp: pytest.MonkeyPatch, module: Any, name: str, calls: list[tuple[tuple[Any, ...], Any]]) -> None:
    """Record (args, result) of every call ``run`` makes to ``module.name``, which still does the work."""
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append((args + tuple(kwargs.values()), result))
        return result

    mp.setattr(module, name, wrapper)


# -------------------------------------------------------------------------------------- references
@torch.inference_mode()
def ref_features(
    backbone: Backbone, split: str, limit: int | None, size: int, layers: str = "cls", flip: bool = False
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST features computed in one batch, the way the protocols are specified to."""
    images, labels = load_fashion_mnist(split, limit=limit)
    x = images.float() / 255
    x = x.flip(-1) if flip else x
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - GREY_MEAN) / GREY_STD
    backbone.eval()
    if layers == "cls":
        return backbone(x)["cls"], labels
    if layers == "cls+avgpool":
        out = backbone(x)
        return torch.cat([out["cls"], out["patch"].mean(1)], dim=1), labels
    blocks = backbone.get_intermediate_layers(x, int(layers.removeprefix("last")))
    return torch.cat([b[:, 0] for b in blocks], dim=1), labels


def ref_standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0, correction=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def top1(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)


# -------------------------------------------------------------------------------------------- data
def make_folder(root: Path, per_class: int = 4) -> Path:
    """An ImageNet-style folder of 16 px grey images, val/ a copy of train/ (each val image's nearest
    train image is itself), every image mirror-symmetric (a horizontal flip leaves it unchanged)."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(per_class):
            half = rng.integers(0, 255, (4, 2), dtype=np.uint8)
            img = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
            for split in ("train", "val"):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                img.resize((16, 16), Image.Resampling.NEAREST).save(root / split / cls / f"{i}.png")
    return root


FOLDER = (("dataset", "imagenet"), ("path", "{tmp}/folder"), ("test_split", "val"))


def folder_row(field: str, check: Check) -> Row:
    """A row reading the folder instead of Fashion-MNIST; ``check`` proves the folder was read."""
    also = tuple(kv for kv in FOLDER if kv[0] != field)
    return Row(field, dict(FOLDER)[field], every(check, missing_folder_is_refused), also)


def missing_folder_is_refused(sc: Scenario, row: Row) -> None:
    with pytest.raises((FileNotFoundError, ValueError)):
        sc.observe(**{**row.overrides, "path": "{tmp}/nowhere"})


def backbone_for(in_chans: int, size: int = 16) -> Backbone:
    torch.manual_seed(0)
    return create_backbone("vit_test", img_size=size, in_chans=in_chans)


# ----------------------------------------------------------------------------------------- coverage
def option_tables() -> dict[str, tuple[type, list[Row]]]:
    # imported here, not at the top: those modules import this one
    from tests.eval import test_protocol_options_dense as dense
    from tests.eval import test_protocol_options_finetune as finetune
    from tests.eval import test_protocol_options_frozen as frozen
    from tests.eval import test_protocol_options_semisup as semisup

    return {**frozen.TABLES, **finetune.TABLES, **dense.TABLES, **semisup.TABLES}


def test_every_config_field_has_a_row() -> None:
    """A new option of any protocol needs a row in its table: a test in which the option matters."""
    tables, protocols = option_tables(), load_protocols()
    assert set(tables) == set(protocols), "a protocol without a table, or a table without a protocol"
    for name, evaluator in protocols.items():
        config, rows = tables[name]
        assert config is evaluator.config
        declared, listed = {f.name for f in fields(config)}, {row.field for row in rows}
        assert not declared - listed, f"{name}: fields without a row: {sorted(declared - listed)}"
        assert not listed - declared, (
            f"{name}: rows for fields that no longer exist: {sorted(listed - declared)}"
        )
