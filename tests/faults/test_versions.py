"""Checkpoints of another format version, or damaged ones, are refused with a message that says why."""

from pathlib import Path

import pytest
import torch

from sopvit.cli import main
from sopvit.train.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from tests.train.tiny import TINY


def test_other_format_version_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"format_version": FORMAT_VERSION - 1, "step": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION - 1}"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert main(["pretrain", *TINY, f"run.output_dir={tmp_path}"]) == 1
    assert f"format version {FORMAT_VERSION - 1}" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated zip"])
def test_damaged_files_are_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a sopvit training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
