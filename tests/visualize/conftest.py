"""One tiny trained run shared by the visualisation tests (training it takes a few seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 steps x batch 16 fill the 64-row [CLS] memory with embeddings of real images.
    run_dir = tmp_path_factory.mktemp("visualize") / "run"
    Trainer(tiny_config(run_dir, "train.max_steps=4")).fit()
    return run_dir


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run that a test may modify."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
