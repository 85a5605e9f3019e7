"""`semisup`: the teacher backbone + projection-head layer 1 + a new classifier, fine-tuned (iBOT's
semi-supervised protocol), from a training run; `sopvit eval semisup` refuses exports (they have no head)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sopvit.cli import main
from sopvit.eval import get_evaluator, load_protocols, semisup
from sopvit.eval.semisup import RepeatedAugSampler, SemisupConfig, lr_at
from sopvit.eval.semisup_model import SemisupClassifier, param_groups
from sopvit.export import export
from sopvit.export.load import load_teacher_encoder, read_run
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config

SMALL = {
    "image_size": 16,
    "limit": 32,
    "epochs": 1,
    "warmup_epochs": 0.5,
    "train_batch_size": 8,
    "lr": 1e-3,
    "num_workers": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-step tiny run (vit_test, head 32 -> 64 -> 64 -> 32), trained once per module."""
    run = tmp_path_factory.mktemp("semisup") / "run"
    Trainer(tiny_config(run, "train.max_steps=1")).fit()
    return run


def test_model_is_backbone_head_layer_1_and_classifier_with_the_teachers_weights(run_dir: Path) -> None:
    teacher = read_run(run_dir)[0]["teacher"]
    model = SemisupClassifier(load_teacher_encoder(run_dir), 1, 10)
    state = model.state_dict()
    backbone = {k for k in teacher if k.startswith("backbone.")}
    head = {"head.mlp.0.weight", "head.mlp.0.bias"}  # Linear(D, hidden); its GELU has no weights
    assert set(state) == backbone | head | {"classifier.weight", "classifier.bias"}
    for key in backbone | head:
        assert torch.equal(state[key], teacher[key]), key
    assert teacher["head.mlp.0.weight"].shape == (64, 32) and state["classifier.weight"].shape == (10, 64)
    x = torch.randn(3, 1, 16, 16)
    model.eval()
    cls = model.backbone(x)["cls"]
    expected = F.gelu(F.linear(cls, teacher["head.mlp.0.weight"], teacher["head.mlp.0.bias"]))
    assert torch.allclose(model.head(cls), expected, atol=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "backbone.mask_token")


def test_weight_decay_on_all_but_biases_and_norms(run_dir: Path) -> None:
    """timm's rule, as the reference's create_optimizer applies it to iBOT's ViT (no exceptions listed)."""
    model = SemisupClassifier(load_teacher_encoder(run_dir), 1, 10)
    decayed, plain = param_groups(model, 0.05)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    m = "backbone.model."
    assert {
        "head.mlp.0.weight",
        "classifier.weight",
        m + "blocks.0.attn.qkv.weight",
        m + "patch_embed.proj.weight",
        m + "cls_token",
        m + "pos_embed",
    } <= decayed_names
    for name in ("head.mlp.0.bias", "classifier.bias", m + "norm.weight", m + "blocks.0.norm1.weight"):
        assert name not in decayed_names, name
    assert len(decayed["params"]) + len(plain["params"]) == len(names) - 1  # all but the mask token


def test_training_changes_the_model_not_the_callers_encoder(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = load_teacher_encoder(run_dir)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    models: list[SemisupClassifier] = []

    class Spy(SemisupClassifier):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            models.append(self)

    monkeypatch.setattr(semisup, "SemisupClassifier", Spy)
    out = semisup.run(encoder, SemisupConfig(**SMALL))
    assert set(out) == {"semisup_top1", "semisup_best_top1", "semisup_best_epoch", "semisup_train_size"}
    assert 0 <= out["semisup_top1"] <= 100 and out["semisup_train_size"] == 32
    trained = models[0].state_dict()
    for key in ("head.mlp.0.weight", "head.mlp.0.bias", "backbone.model.blocks.0.attn.qkv.weight"):
        assert not torch.equal(trained[key], before[key]), f"{key} was not trained"
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_runs_semisup_on_a_run_directory(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_protocols()
    assert get_evaluator("semisup").needs_head and not get_evaluator("finetune").needs_head
    overrides = [f"{k}={v}" for k, v in SMALL.items()]
    argv = ["eval", "semisup", "--checkpoint", str(run_dir), *overrides, "--json", str(tmp_path / "s.json")]
    code, out, _ = _eval(argv, capsys)
    assert code == 0
    printed = json.loads(out.strip().splitlines()[-2])
    expected = semisup.run(load_teacher_encoder(run_dir), SemisupConfig(**SMALL))
    assert printed["eval"] == "semisup" and {k: printed[k] for k in expected} == expected
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["config"]["head_layers"] == 1 and saved["config"]["lr"] == SMALL["lr"]


def test_exports_and_bare_state_dicts_are_refused_in_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = export(run_dir, "safetensors", tmp_path / "st", include_head=True)
    timm_file = export(run_dir, "timm", tmp_path / "timm" / "model.pth")
    for path in (folder, folder / "model.safetensors", timm_file):
        code, _, err = _eval(["eval", "semisup", "--checkpoint", str(path), "device=cpu"], capsys)
        assert code == 2
        assert err.count("\n") == 1 and "is an export, which has no projection head" in err
        assert "pass the run directory" in err
    teacher = read_run(run_dir)[0]["teacher"]
    torch.save({"teacher": teacher}, tmp_path / "bare.pth")
    argv = ["eval", "semisup", "--checkpoint", str(tmp_path / "bare.pth"), "--arch", "vit_test"]
    code, _, err = _eval(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "not a sopvit training checkpoint" in err and "pass the run directory" in err


def test_repeated_augmentation_deals_the_copies_to_different_ranks() -> None:
    ranks = [list(RepeatedAugSampler(12, 3, seed=0, world=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    images = [[i // 3 for i in r] for r in ranks]
    assert images[0] == images[1] == images[2]  # each rank holds one copy of the same 4 images
    assert len({i for r in ranks for i in r}) == 12  # distinct copies: each gets its own views
    one = RepeatedAugSampler(12, 3, seed=0, world=1, rank=0)
    first = list(one)
    assert [i // 3 for i in first] == [i // 3 for i in first[::3] for _ in range(3)]
    one.set_epoch(1)
    assert list(one) != first
    assert sorted(RepeatedAugSampler(10, 1, seed=0, world=1, rank=0)) == list(range(10))


def test_reference_lr_is_flat_after_warm_up_at_batch_1024() -> None:
    """eval_cls.py's values: lr 5e-6 x 1024 / 512 = 1e-5 = min_lr, so the cosine has nothing to decay."""
    cfg = SemisupConfig()
    peak = cfg.lr * 1024 / 512
    lrs = [lr_at(t, 1000, 5, peak, cfg.warmup_lr, cfg.min_lr) for t in range(1000)]
    assert lrs[0] == cfg.warmup_lr and lrs[5] == pytest.approx(1e-5)
    assert lrs[5:] == pytest.approx([1e-5] * 995)
    assert lrs[:6] == pytest.approx([1e-6 + (1e-5 - 1e-6) * t / 5 for t in range(6)])


@pytest.mark.parametrize(
    ("field", "value"),
    [("head_layers", -1), ("eval_every", 0), ("repeated_aug", 0), ("reprob", 1.5), ("auto_augment", "x")],
)
def test_config_validation(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SemisupConfig(**{field: value}).validate()


def test_head_layers_beyond_the_head_are_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="head_layers: the checkpoint's projection head has 3 layers, got 4"):
        SemisupClassifier(load_teacher_encoder(run_dir), 4, 10)
    with torch.no_grad():  # all three layers: the head whole, its output L2-normalised
        full: Tensor = SemisupClassifier(load_teacher_encoder(run_dir), 3, 10).head(torch.randn(2, 32))
    assert full.shape == (2, 32) and torch.allclose(full.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_semisup_under_torchrun_trains_one_ddp_model(run_dir: Path) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["--checkpoint", str(run_dir), *(f"{k}={v}" for k, v in SMALL.items() if k != "device")]
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "sopvit", "eval", "semisup", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # only rank 0 reports
    out = json.loads(lines[0])
    # each rank trains on its deal of the 32 images; the test set is sharded and summed back
    assert out["semisup_train_size"] == 32 and 0 <= out["semisup_top1"] <= 100
