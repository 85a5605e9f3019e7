"""What a newcomer meets first: `--help` listing the protocols, `--version`, `--debug`."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import sopvit
from sopvit.cli import main
from sopvit.eval import load_protocols


def _exit_output(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_eval_help_lists_every_protocol_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    out = _exit_output(["eval", "--help"], capsys)
    registry = load_protocols()
    assert len(registry) >= 8
    lines = out.splitlines()
    for name, evaluator in registry.items():
        # one row per protocol: its name, then its summary on the same line
        assert any(line.split()[:1] == [name] and evaluator.summary in line for line in lines), name
    top = _exit_output(["--help"], capsys)
    assert all(name in top for name in registry)


def test_unknown_protocol_names_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knnn", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'knnn'" in err and all(name in err for name in load_protocols())


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    version = _exit_output(["--version"], capsys).strip()
    assert version == f"sopvit {importlib.metadata.version('sopvit')}" == f"sopvit {sopvit.__version__}"


def _config_error(argv_prefix: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main([*argv_prefix, "pretrain", "train.lrr=0.1"]) == 2
    return capsys.readouterr().err.strip().splitlines()


def test_errors_are_one_line_unless_debug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOPVIT_DEBUG", raising=False)
    message = "sopvit: config error: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    assert _config_error([], capsys) == [message]
    debug = _config_error(["--debug"], capsys)
    assert debug[0] == "Traceback (most recent call last):" and "ConfigError" in "\n".join(debug)
    assert debug[-1] == message  # the traceback comes first; the explanation stays the last line

    missing = str(tmp_path / "no_run")
    export = ["export", "--checkpoint", missing, "--format", "timm", "--out", str(tmp_path / "out")]
    assert main(export) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main([*export, "--debug"]) == 2  # also accepted after the subcommand
    err = capsys.readouterr().err
    assert (
        "Traceback" in err
        and "FileNotFoundError" in err
        and err.strip().splitlines()[-1].endswith(f"{missing} does not exist")
    )


def test_debug_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOPVIT_DEBUG", "1")
    assert "Traceback (most recent call last):" in _config_error([], capsys)
    monkeypatch.setenv("SOPVIT_DEBUG", "0")
    assert len(_config_error([], capsys)) == 1
