"""Checkpoints of another format version, or damaged ones, are refused with a message that says why."""

from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from sopvit.cli import main
from tests.train.tiny import TINY


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1])
def test_other_format_version_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: int
) -> None:
    torch.save({"format_version": version, "step": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"format version {version}"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert main(["pretrain", *TINY, f"run.output_dir={tmp_path}"]) == 1
    assert f"format version {version}" in capsys.readouterr().err


def test_a_version_1_run_is_read_but_not_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Version 1 kept tokens out of weight decay: its optimizer groups no longer fit, its weights do."""
    from sopvit.export import load_pretrained

    run = tmp_path / "run"
    assert main(["pretrain", *TINY, f"run.output_dir={run}", "train.max_steps=1"]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    torch.save({**state, "format_version": 1}, run / "checkpoint.pt")
    assert load_pretrained(run).embed_dim > 0  # export, eval and visualize still read it
    capsys.readouterr()
    assert main(["pretrain", *TINY, f"run.output_dir={run}", "train.max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert "cannot resume exactly" in err and "format 1" in err


@pytest.mark.parametrize("old", [True, False])
def test_a_run_saved_with_the_retired_batched_augment_key_still_loads(tmp_path: Path, old: bool) -> None:
    from sopvit.export.load import read_run
    from sopvit.visualize.attention import load_run

    run = tmp_path / "run"
    assert main(["pretrain", *TINY, f"run.output_dir={run}", "train.max_steps=1"]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    data = {k: v for k, v in state["config"]["data"].items() if k != "augment_on"}
    state["config"]["data"] = {**data, "batched_augment": old}
    torch.save(state, run / "checkpoint.pt")
    expected = "device" if old else "workers"
    assert read_run(run)[1].data.augment_on == load_run(run).config.data.augment_on == expected


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated zip"])
def test_damaged_files_are_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a sopvit training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
