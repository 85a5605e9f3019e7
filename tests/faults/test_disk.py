"""Disk full or read-only output at checkpoint time: a clear stop, and the previous checkpoint survives."""

import errno
from pathlib import Path
from typing import Any

import pytest

import sopvit.checkpoints.checkpoint as ckpt
from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.cli import main
from tests.train.tiny import TINY


def _fail_after(monkeypatch: pytest.MonkeyPatch, target: str, n_ok: int, code: int) -> None:
    real = ckpt.torch.save if target == "save" else open
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > n_ok:
            raise OSError(code, errno.errorcode[code] and __import__("os").strerror(code))
        return real(*args, **kwargs)

    if target == "save":
        monkeypatch.setattr(ckpt.torch, "save", flaky)
    else:
        monkeypatch.setattr(ckpt, "open", flaky, raising=False)


@pytest.mark.parametrize(
    ("target", "code", "text"),
    [("save", errno.ENOSPC, "No space left on device"), ("open", errno.EROFS, "Read-only file system")],
)
def test_checkpoint_write_failure_stops_cleanly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    code: int,
    text: str,
) -> None:
    _fail_after(monkeypatch, target, n_ok=1, code=code)
    args = ["pretrain", *TINY, f"run.output_dir={tmp_path}", "train.max_steps=6", "run.checkpoint_every=2"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert text in err and "previous checkpoint" in err and "checkpoint.pt" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*"))
