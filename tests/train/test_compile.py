"""``train.compile=true`` trains: compiled blocks give eager's numbers over a few steps on the CPU.

Compiling the whole student failed in its first backward, in the bicubic resampling of the position
embedding for the local crops; the blocks alone are compiled now (``Backbone.compile_blocks``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config


@pytest.mark.slow
def test_three_compiled_steps_equal_eager_within_float_tolerance(tmp_path: Path) -> None:
    rows, weights = {}, {}
    for mode in ("eager", "compiled"):
        flags = ("train.max_steps=3", "run.log_every=1", f"train.compile={mode == 'compiled'}")
        trainer = Trainer(tiny_config(tmp_path / mode, *flags))
        rows[mode] = trainer.fit()
        weights[mode] = trainer.model.student.state_dict()
    assert rows["compiled"]["loss"] == pytest.approx(rows["eager"]["loss"], rel=1e-4)
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=1e-4, atol=1e-5, msg=key)
