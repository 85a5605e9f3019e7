"""Monitor pinned: when it logs, what a logged row holds, where it goes, and that a disabled one is silent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sopvit.train.monitor import Monitor


def _metrics(loss: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss), "loss_cls": torch.tensor(2 * loss)}


def test_rows_average_the_steps_since_the_last_row(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path, total_steps=5, start_step=0, images_per_step=8, log_every=2, enabled=True)
    schedule = {"lr": 0.1, "teacher_temp": 0.04}
    assert monitor.update(1, _metrics(1.0), schedule) == {}
    row = monitor.update(2, {"skipped": torch.ones(())}, schedule)
    assert row["loss"] == 1.0 and row["loss_cls"] == 2.0 and row["skipped_steps"] == 1.0
    assert row["lr"] == 0.1 and row["teacher_temp"] == 0.04 and row["images_per_s"] > 0
    assert monitor.update(3, _metrics(3.0), schedule) == {}
    assert monitor.update(4, _metrics(5.0), schedule)["loss"] == 4.0
    last = monitor.update(5, _metrics(7.0), schedule)  # the last step always logs
    assert last["loss"] == 7.0 and last["skipped_steps"] == 0.0
    monitor.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]
    assert lines[1]["loss"] == 4.0 and lines[1]["lr"] == 0.1
    assert any((tmp_path / "tensorboard").iterdir())  # TensorBoard by default
    assert monitor.bar is not None and monitor.bar.total == 5 and monitor.bar.n == 5  # progress by default


def test_a_resumed_monitor_appends_and_counts_from_the_start_step(tmp_path: Path) -> None:
    Monitor(tmp_path, 4, 0, 1, 1, True, tensorboard=False, progress=False).write(1, {"a": 1.0})
    monitor = Monitor(tmp_path, 4, 2, 1, 1, True, tensorboard=False, progress=True)
    assert monitor.bar.n == 2 and monitor.bar.total == 4
    monitor.write(3, {"a": 2.0})
    monitor.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 3]
    assert not (tmp_path / "tensorboard").exists()


def test_messages_go_to_the_terminal_only_when_enabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Monitor(tmp_path, 2, 0, 1, 1, True, tensorboard=False, progress=False).message("hello")
    Monitor(tmp_path / "off", 2, 0, 1, 1, False).message("quiet")
    out = capsys.readouterr().out
    assert "hello" in out and "quiet" not in out


def test_a_disabled_monitor_writes_nothing(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path, 2, 0, 1, 1, enabled=False)
    assert monitor.update(2, _metrics(1.0), {"lr": 0.1}) == {}
    monitor.write(2, {"a": 1.0})
    monitor.close()
    assert list(tmp_path.iterdir()) == []


def test_images_per_second_counts_the_steps_since_the_last_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([10.0, 10.5, 12.5])  # construction, row at step 2, row at step 4
    monkeypatch.setattr("sopvit.train.monitor.time.perf_counter", lambda: next(clock))
    monitor = Monitor(tmp_path, 4, 0, 8, 2, True, tensorboard=False, progress=False)
    schedule = {"lr": 0.1}
    monitor.update(1, _metrics(1.0), schedule)
    assert monitor.update(2, _metrics(1.0), schedule)["images_per_s"] == 8 * 2 / 0.5
    monitor.update(3, _metrics(1.0), schedule)
    assert monitor.update(4, _metrics(1.0), schedule)["images_per_s"] == 8 * 2 / 2.0
    monitor.close()


def test_a_row_holds_the_metrics_the_schedule_and_the_rate_only(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path, 2, 0, 1, 2, True, tensorboard=False, progress=True)
    monitor.update(1, {"skipped": torch.ones(())}, {"lr": 0.5})
    row = monitor.update(2, _metrics(1.5), {"lr": 0.5})
    assert set(row) == {"loss", "loss_cls", "skipped_steps", "lr", "images_per_s"}
    postfix = monitor.bar.postfix
    assert "loss=1.5000" in postfix and "lr=5.00e-01" in postfix and re.search(r"img_s=\d+", postfix)
    assert monitor.bar.unit == "step"
    monitor.close()


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_gets_every_row_and_a_resume_keeps_the_checkpointed_step(tmp_path: Path) -> None:
    first = Monitor(tmp_path, 4, 0, 1, 1, True, progress=False)
    for step in (1, 2, 3):  # killed after step 3, last checkpoint at step 2
        first.write(step, {"loss": float(step)})
    first.close()
    resumed = Monitor(tmp_path, 4, 2, 1, 1, True, progress=False)
    resumed.write(3, {"loss": 30.0})
    resumed.close()
    assert _scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_messages_do_not_break_the_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = Monitor(tmp_path, 2, 0, 1, 1, True, tensorboard=False, progress=True)
    written: list[str] = []
    monkeypatch.setattr(monitor.bar, "write", written.append)
    monitor.message("hello")
    assert written == ["hello"]
    monitor.close()


def test_an_interval_of_skipped_steps_only_still_updates_the_bar(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path, 2, 0, 1, 2, True, tensorboard=False, progress=True)
    monitor.update(1, {"skipped": torch.ones(())}, {"lr": 0.5})
    row = monitor.update(2, {"skipped": torch.ones(())}, {"lr": 0.5})
    assert "loss" not in row and row["skipped_steps"] == 2.0
    assert "loss=nan" in monitor.bar.postfix
    monitor.close()
