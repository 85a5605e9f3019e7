"""A checkpoint, reference checkpoint or ground-truth pickle that would run code is refused unopened.

Each crafted file would create ``target`` while being unpickled; every loader must refuse it naming the
offending type and the file, and ``target`` must not exist afterwards. Real files of each kind still load.
Sharded checkpoints (FSDP runs) hold two pickles: the DCP index ``.metadata`` and each non-tensor entry.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from sopvit.checkpoints.checkpoint import FORMAT_VERSION, load_checkpoint
from sopvit.checkpoints.run_dir import read_checkpoint
from sopvit.checkpoints.safe_load import UnsafeFileError
from sopvit.cli import main
from sopvit.eval.retrieval import load_gnd
from sopvit.export import export, load_pretrained, load_reference_checkpoint
from sopvit.models import Backbone
from sopvit.train.trainer import Trainer
from tests.export.test_export import features, images, reference_dict
from tests.train.tiny import TINY, tiny_config, tiny_run, tiny_teacher

# What each payload calls, and how the refusal names it (protocol-2 pickles reach Path.touch via getattr).
PAYLOADS = {"system": r"posix\.system|nt\.system", "eval": r"builtins\.eval", "touch": r"getattr|pathlib"}


class RunsCode:
    """Unpickling this creates ``target``: it stands for any code a crafted file could run."""

    def __init__(self, how: str, target: Path) -> None:
        self.how, self.target = how, target

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "system":
            return (os.system, (f"touch {shlex.quote(str(self.target))}",))
        if self.how == "eval":
            return (eval, (f"open({str(self.target)!r}, 'w').close()",))
        return (Path.touch, (self.target,))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory, "unsafe")


@pytest.fixture(scope="module")
def teacher(run_dir: Path) -> Backbone:
    return tiny_teacher(run_dir)


def one_line_error(capsys: pytest.CaptureFixture[str], path: Path, how: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sopvit: error: refusing to load {path}: it asks for ")
    assert "may be malicious" in lines[0]
    assert re.search(PAYLOADS[how], lines[0]), lines[0]


@pytest.mark.parametrize("how", list(PAYLOADS))
def test_payloads_are_live(tmp_path: Path, how: str) -> None:
    """The full unpickler does run them: the refusals below are not vacuous."""
    pickle.loads(pickle.dumps(RunsCode(how, tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("how", list(PAYLOADS))
def test_crafted_training_checkpoint(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    target, shared = tmp_path / "ran", tmp_path / "shared_run"
    shared.mkdir()
    state = load_checkpoint(run_dir / "checkpoint.pt")
    state["rng"][0]["numpy"] = RunsCode(how, target)  # tampered where nobody would look
    ckpt = shared / "checkpoint.pt"
    torch.save(state, ckpt)
    with pytest.raises(UnsafeFileError, match=rf"refusing to load {ckpt}: it asks for .*({PAYLOADS[how]})"):
        load_checkpoint(ckpt)
    for source in (shared, ckpt):
        with pytest.raises(UnsafeFileError, match="may be malicious"):
            load_pretrained(source)
    out = str(tmp_path / "exported")
    assert main(["export", "--checkpoint", str(shared), "--format", "hf", "--out", out]) == 2
    one_line_error(capsys, ckpt, how)
    assert main(["eval", "knn", "--checkpoint", str(ckpt)]) == 2
    one_line_error(capsys, ckpt, how)
    assert main(["pretrain", *TINY, f"run.output_dir={shared}"]) == 2  # resuming reads it too
    one_line_error(capsys, ckpt, how)
    assert not target.exists() and not Path(out).exists()


@pytest.mark.parametrize("how", list(PAYLOADS))
def test_crafted_reference_checkpoint(
    teacher: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    target, path = tmp_path / "ran", tmp_path / "dino_vitsmall16_pretrain.pth"
    torch.save({**reference_dict(teacher), "args": RunsCode(how, target)}, path)
    with pytest.raises(UnsafeFileError, match=PAYLOADS[how]):
        load_reference_checkpoint(path, "vit_test")
    assert main(["eval", "knn", "--checkpoint", str(path), "--arch", "vit_test"]) == 2
    one_line_error(capsys, path, how)
    assert not target.exists()


def test_crafted_timm_export(run_dir: Path, tmp_path: Path) -> None:
    path = export(run_dir, "timm", tmp_path / "timm")
    torch.save({**torch.load(path, weights_only=True), "x": RunsCode("eval", tmp_path / "ran")}, path)
    with pytest.raises(UnsafeFileError, match=r"builtins\.eval"):
        load_pretrained(path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("how", list(PAYLOADS))
def test_crafted_ground_truth(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, protocol: int
) -> None:
    target, path = tmp_path / "ran", tmp_path / "gnd_roxford5k.pkl"
    with path.open("wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": [], "gnd": [RunsCode(how, target)]}, f, protocol=protocol)
    with pytest.raises(UnsafeFileError, match=rf"refusing to load {path}: it asks for .*({PAYLOADS[how]})"):
        load_gnd(tmp_path, "roxford5k")
    assert main(["eval", "retrieval", "--checkpoint", str(run_dir), f"root={tmp_path}"]) == 2
    one_line_error(capsys, path, how)
    assert not target.exists()


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    """An object array would smuggle arbitrary Python objects; numeric arrays are all a loader needs."""
    torch.save({"x": np.array([1, "a"], dtype=object)}, tmp_path / "a.pt")
    with pytest.raises(UnsafeFileError, match="ObjectDType"):
        load_reference_checkpoint(tmp_path / "a.pt", "vit_test")
    with (tmp_path / "gnd_rparis6k.pkl").open("wb") as f:
        pickle.dump({"imlist": np.array(["a", 1], dtype=object)}, f)
    with pytest.raises(UnsafeFileError, match="dtype object"):
        load_gnd(tmp_path, "rparis6k")


def test_real_training_checkpoint_loads_and_resumes(run_dir: Path, tmp_path: Path) -> None:
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["format_version"] == FORMAT_VERSION and state["step"] == 1
    numpy_rng = state["rng"][0]["numpy"]
    assert numpy_rng[0] == "MT19937" and numpy_rng[1].dtype == np.uint32 and numpy_rng[1].shape == (624,)
    assert isinstance(state["rng"][0]["python"], tuple) and isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert state["optimizer"]["state"] and isinstance(state["config"], dict)
    load_pretrained(run_dir)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    resumed = Trainer(tiny_config(copy, "train.max_steps=2"))  # restores every RNG state
    assert resumed.step == 1
    resumed.fit()
    assert load_checkpoint(copy / "checkpoint.pt")["step"] == 2


def test_real_reference_checkpoint_loads(teacher: Backbone, tmp_path: Path) -> None:
    """Laid out as the DINO/iBOT/SOP code saves it: Namespace args, optimizer, scaler, numpy values."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in teacher.parameters()]
    optimizer = torch.optim.AdamW(params)
    torch.stack([p.sum() for p in params]).sum().backward()
    optimizer.step()
    args = argparse.Namespace(
        arch="vit_small", patch_size=16, out_dim=8192, lr=5e-4, batch_size_per_gpu=64,
        global_crops_scale=(0.25, 1.0), pred_ratio=[0.0, 0.3], data_path="/imagenet/train", use_fp16=True,
    )  # fmt: skip
    checkpoint = {
        **reference_dict(teacher),
        "args": args,
        "epoch": 3,
        "optimizer": optimizer.state_dict(),
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
        "dino_loss": {"center": torch.zeros(1, 8)},
        "best_acc": np.float64(71.5),
        "seed": np.int64(0),
        "momentum_schedule": np.linspace(0.996, 1.0, 5),
    }
    path = tmp_path / "checkpoint0003.pth"
    torch.save(checkpoint, path)
    loaded = load_reference_checkpoint(path, "vit_test")
    x = images()
    assert (features(loaded, x) - features(teacher, x)).abs().max().item() < 1e-6


def real_ground_truth() -> dict[str, Any]:
    """Shaped like revisitop's gnd_roxford5k.pkl: names, and per query a box and index arrays."""
    return {
        "imlist": ["all_souls_000000", "oxford_002985", "radcliffe_camera_000519"],
        "qimlist": ["all_souls_000013", "ashmolean_000058"],
        "gnd": [
            {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": np.array([0]), "hard": np.array([1]),
             "junk": np.array([], dtype=np.int64)},
            {"bbx": [25.0, 238.0, 995.0, 704.0], "easy": [2], "hard": [], "junk": [0, 1]},
        ],
    }  # fmt: skip


@pytest.mark.parametrize("variant", ["protocol2", "protocol4", "protocol5", "numpy1_names"])
def test_real_ground_truth_loads(tmp_path: Path, variant: str) -> None:
    data = pickle.dumps(real_ground_truth(), protocol=2 if variant == "numpy1_names" else int(variant[-1]))
    if variant == "numpy1_names":  # as written before numpy 2 renamed numpy.core to numpy._core
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in data
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(data)
    loaded = load_gnd(tmp_path, "roxford5k")
    expected = real_ground_truth()
    assert loaded["imlist"] == expected["imlist"] and loaded["qimlist"] == expected["qimlist"]
    for got, want in zip(loaded["gnd"], expected["gnd"], strict=True):
        assert got["bbx"] == want["bbx"]
        for key in ("easy", "hard", "junk"):
            assert list(got[key]) == list(want[key]) and type(got[key]) is type(want[key])
    assert loaded["gnd"][0]["easy"].dtype == np.int64


def test_damaged_ground_truth_is_a_one_line_value_error(tmp_path: Path) -> None:
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable ground-truth pickle"):
        load_gnd(tmp_path, "roxford5k")


# ------------------------------------------------------------------------------------- sharded checkpoints
SHARDED = "checkpoint-000001"
EVERY_PART = frozenset({"student", "teacher", "optimizer", "objective"})


class Opaque:
    """An object of a class no checkpoint holds: harmless, but its type is outside every allowlist."""


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unsafe_sharded") / "run"
    Trainer(tiny_config(path, "train.parallel=fsdp", "train.max_steps=1")).fit()
    assert (path / SHARDED / ".metadata").is_file()
    return path


def _resume(run: Path) -> Trainer:
    return Trainer(tiny_config(run, "train.parallel=fsdp", "train.max_steps=2"))


@pytest.mark.parametrize("how", list(PAYLOADS))
def test_crafted_sharded_index(
    sharded_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    target, shared = tmp_path / "ran", Path(shutil.copytree(sharded_run, tmp_path / "shared_run"))
    index = shared / SHARDED / ".metadata"
    index.write_bytes(pickle.dumps(RunsCode(how, target)))
    refused = rf"refusing to load {re.escape(str(index))}: it asks for .*({PAYLOADS[how]})"
    for source in (shared, shared / SHARDED):
        with pytest.raises(UnsafeFileError, match=refused):
            load_pretrained(source)
    with pytest.raises(UnsafeFileError, match=refused):
        _resume(shared)
    out = str(tmp_path / "exported")
    assert main(["export", "--checkpoint", str(shared), "--format", "hf", "--out", out]) == 2
    one_line_error(capsys, index, how)
    assert main(["pretrain", *TINY, f"run.output_dir={shared}", "train.parallel=fsdp"]) == 2
    one_line_error(capsys, index, how)
    assert not target.exists() and not Path(out).exists()


def _with_bytes_entry(run: Path, tmp_path: Path, value: Any) -> Path:
    """A copy of ``run`` whose checkpoint holds ``value`` where a real one holds an int (a memory bank's
    write pointer, which DCP stores as a pickled bytes entry), saved by DCP itself."""
    shared = Path(shutil.copytree(run, tmp_path / "shared_run"))
    folder = shared / SHARDED
    state = read_checkpoint(folder, EVERY_PART)
    assert isinstance(state["objective"]["cls_bank._extra_state"]["pointer"], int)
    state["objective"]["cls_bank._extra_state"]["pointer"] = value
    for old in folder.iterdir():
        if old.name != "sopvit.pt":
            old.unlink()
    with warnings.catch_warnings():  # DCP warns that one process saves alone, which is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({part: state[part] for part in EVERY_PART}, checkpoint_id=folder, no_dist=True)
    return shared


BYTES_PAYLOADS = {"system": PAYLOADS["system"], "custom_class": r"tests\.faults\.test_unsafe_files\.Opaque"}


@pytest.mark.parametrize("how", list(BYTES_PAYLOADS))
def test_crafted_sharded_bytes_entry(
    sharded_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    target = tmp_path / "ran"
    shared = _with_bytes_entry(
        sharded_run, tmp_path, Opaque() if how == "custom_class" else RunsCode(how, target)
    )
    folder = shared / SHARDED
    refused = rf"refusing to load {re.escape(str(folder))}: it asks for .*({BYTES_PAYLOADS[how]})"
    for source in (shared, folder):
        with pytest.raises(UnsafeFileError, match=refused):
            load_pretrained(source)
    assert main(["eval", "knn", "--checkpoint", str(shared)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(f"sopvit: error: {refused}", lines[0]), lines
    assert "may be malicious" in lines[0]
    assert not target.exists()


def test_resuming_from_a_crafted_sharded_bytes_entry(sharded_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "ran"
    shared = _with_bytes_entry(sharded_run, tmp_path, RunsCode("system", target))
    try:
        with pytest.raises(UnsafeFileError, match=rf"it asks for .*({PAYLOADS['system']})"):
            _resume(shared)
    finally:
        assert not target.exists()  # refused, whichever way it is reported


def test_real_sharded_checkpoint_loads_and_resumes(sharded_run: Path, tmp_path: Path) -> None:
    """Every pickle a real sharded checkpoint holds passes the allowlists: the refusals are not blanket."""
    load_pretrained(sharded_run)
    copy = Path(shutil.copytree(sharded_run, tmp_path / "run"))
    resumed = _resume(copy)
    assert resumed.step == 1
    resumed.fit()
    assert (copy / "checkpoint.latest").read_text().strip() == "checkpoint-000002"
