"""Checkpoint files pinned: what is written, where, which versions load, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from sopvit.checkpoints.run_dir import latest_checkpoint


def test_round_trip_adds_the_format_version_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / LATEST
    save_checkpoint({"step": 3, "weights": torch.arange(4.0)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    state = load_checkpoint(path)
    assert state["format_version"] == FORMAT_VERSION == 2 and state["step"] == 3
    assert torch.equal(state["weights"], torch.arange(4.0))
    save_checkpoint({"step": 4}, path)  # replaces the previous one
    assert load_checkpoint(path)["step"] == 4


def test_the_latest_checkpoint_is_checkpoint_pt(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint.pt").mkdir()  # not a file
    assert latest_checkpoint(tmp_path) is None
    other = tmp_path / "other"
    other.mkdir()
    save_checkpoint({"step": 1}, other / "checkpoint.pt")
    assert latest_checkpoint(other) == other / "checkpoint.pt"


@pytest.mark.parametrize("version", [1, 2])
def test_versions_one_and_two_are_read(tmp_path: Path, version: int) -> None:
    torch.save({"format_version": version, "step": 5}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"format_version": 3}, "has format version 3; this sopvit reads versions 1 and 2"),
        ({"format_version": 0}, "format version 0"),
        ({"step": 1}, "no format_version"),
        ([1, 2], "no format_version"),
    ],
)
def test_foreign_files_are_refused(tmp_path: Path, content: object, message: str) -> None:
    torch.save(content, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c.pt")


def test_missing_and_damaged_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt is unreadable"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_write_into_a_missing_folder_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*: No such file or directory"):
        save_checkpoint({"step": 1}, tmp_path / "missing" / "checkpoint.pt")


def test_a_failed_write_names_the_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("the volume went away")  # no errno: the message is the reason

    monkeypatch.setattr("sopvit.checkpoints.checkpoint.torch.save", fail)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*: the volume went away"):
        save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []
