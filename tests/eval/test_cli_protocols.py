"""`sopvit eval retrieval|davis|robustness --checkpoint RUN ...` end to end on test-sized data."""

import json
import math
from pathlib import Path

import pytest

from sopvit.cli import main
from sopvit.train.trainer import Trainer
from tests.eval.test_davis import make_davis
from tests.eval.test_retrieval import make_retrieval
from tests.eval.test_robustness import make_in9
from tests.train.tiny import tiny_config


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-step tiny run, trained once per module; RGB because these protocols read colour images."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    Trainer(tiny_config(run_dir, "train.max_steps=1", "data.in_chans=3")).fit()
    return run_dir


def _eval(name: str, run: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> dict[str, float]:
    """Run the CLI, check the table it prints, and return its JSON line."""
    assert main(["eval", name, "--checkpoint", str(run), "device=cpu", *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result.pop("eval") == name and result.pop("checkpoint") == str(run)
    assert lines[0].startswith(f"{name}: ")
    table = dict(line.split() for line in lines[1:-1])  # "  key  value" rows, one per metric
    assert list(table) == list(result)
    for key, value in result.items():
        assert float(table[key]) == pytest.approx(value, rel=1e-3, nan_ok=True), key
    return result


def test_retrieval_from_cli(rgb_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_retrieval(tmp_path / "rox")
    out = _eval("retrieval", rgb_run, capsys, f"root={tmp_path / 'rox'}", "image_size=32", "scales=[1.0,0.5]")
    assert set(out) == {
        f"rox_{p}_{m}" for p in ("medium", "hard") for m in ("map", "mp@1", "mp@5", "mp@10", "n_empty")
    }
    assert all(0.0 <= out[f"rox_{p}_map"] <= 100.0 for p in ("medium", "hard"))
    assert out["rox_medium_n_empty"] == 1.0


def test_davis_from_cli(rgb_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_davis(tmp_path / "davis", videos=("a", "b"))
    out_dir = tmp_path / "pred"
    out = _eval("davis", rgb_run, capsys, f"root={tmp_path / 'davis'}", f"output_dir={out_dir}")
    assert set(out) == {"davis_jf_mean", "davis_j_mean", "davis_f_mean"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in out.values())
    assert out["davis_jf_mean"] == pytest.approx((out["davis_j_mean"] + out["davis_f_mean"]) / 2)
    assert all(len(list((out_dir / v).glob("*.png"))) == 3 for v in ("a", "b"))


def test_robustness_from_cli(rgb_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    variants = ("original", "mixed_same", "mixed_rand")
    make_in9(tmp_path / "in9", variants, per_class=4)
    out = _eval(
        "robustness",
        rgb_run,
        capsys,
        f"path={tmp_path / 'in9'}",
        "image_size=16",
        f"variants=[{','.join(variants)}]",
        "epochs=5",
        "train_batch_size=8",
    )
    assert set(out) == {f"robustness_top1_{v}" for v in variants} | {"robustness_bg_gap"}
    assert all(0.0 <= out[f"robustness_top1_{v}"] <= 100.0 for v in variants)
    gap = out["robustness_top1_mixed_same"] - out["robustness_top1_mixed_rand"]
    assert out["robustness_bg_gap"] == pytest.approx(gap)


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("retrieval", "root", "gnd_roxford5k.pkl"),
        ("davis", "root", "val.txt"),
        ("robustness", "path", "original"),
    ],
)
def test_missing_root_is_a_one_line_error(
    rgb_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, key: str, expected: str
) -> None:
    missing = tmp_path / "nowhere"
    assert main(["eval", name, "--checkpoint", str(rgb_run), "device=cpu", f"{key}={missing}"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sopvit: error: "), err
    assert str(missing) in err and expected in err
    assert "Traceback" not in captured.out + captured.err
