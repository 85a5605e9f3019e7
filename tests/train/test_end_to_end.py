"""Tiny pre-training runs on CPU: train, resume exactly, evaluate; bad inputs and NaNs."""

import json
from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import CheckpointError, load_checkpoint
from sopvit.cli import main
from sopvit.recipe.config import PretrainConfig
from sopvit.train.online_knn import knn_of_backbone
from sopvit.train.step import NonFiniteLossError
from sopvit.train.trainer import Trainer
from tests.train.tiny import poison, tiny_config


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.pt")


def _assert_equal(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where} keys differ"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, f"{where} differs"


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("student", "teacher", "objective", "optimizer"):
        _assert_equal(a[part], b[part], part)


# Every source of randomness on: drop path (the global torch RNG), random mask ratios and masked/unmasked
# images (iBOT's mix), KoLeo, low-CV anchors and k-NN supports (the objective's generators), all crops.
ALL_RANDOM = (
    "model.drop_path_rate=0.3",
    "data.mask_prob=0.5",
    "data.mask_ratio=[0.1,0.5]",
    "sop.anchor_selection=low_cv",
    "sop.cls_keep_fraction=0.5",
    "sop.koleo_weight=0.1",
)


@pytest.mark.parametrize("random", [False, True], ids=["plain", "all-random"])
@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_interrupted_and_resumed_run_equals_uninterrupted(
    tmp_path: Path, augment_on: str, random: bool
) -> None:
    flags = [f"data.augment_on={augment_on}", *(ALL_RANDOM if random else ())]
    Trainer(tiny_config(tmp_path / "straight", *flags, "train.max_steps=7")).fit()
    Trainer(tiny_config(tmp_path / "resumed", *flags, "train.max_steps=4")).fit()
    resumed = Trainer(tiny_config(tmp_path / "resumed", *flags, "train.max_steps=7"))
    assert resumed.step == 4
    resumed.fit()
    _assert_same_run(_final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed"))


def test_drop_path_makes_the_run_depend_on_the_restored_rng(tmp_path: Path) -> None:
    """The all-random resume test above is only meaningful if the torch RNG state changes the result."""
    flags = [*ALL_RANDOM, "train.max_steps=2"]
    Trainer(tiny_config(tmp_path / "a", *flags)).fit()
    other = Trainer(tiny_config(tmp_path / "b", *flags))
    torch.manual_seed(12345)  # same weights and data, another drop-path stream
    other.fit()
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert not torch.equal(
        a["student"]["backbone.model.blocks.0.attn.qkv.weight"],
        b["student"]["backbone.model.blocks.0.attn.qkv.weight"],
    )


def test_pretrain_resume_then_knn_from_the_cli(tmp_path: Path) -> None:
    from tests.train.tiny import TINY

    assert main(["pretrain", *TINY, f"run.output_dir={tmp_path}", "train.max_steps=2"]) == 0
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert _final_state(tmp_path)["step"] == 2
    assert main(["pretrain", *TINY, f"run.output_dir={tmp_path}", "train.max_steps=4"]) == 0  # resumes
    state = _final_state(tmp_path)
    assert state["step"] == 4
    assert state["objective"]["cls_bank._extra_state"]["pointer"] == (4 * 16) % 64
    trainer = Trainer(
        tiny_config(tmp_path, "train.max_steps=4", "run.knn_dataset=fashion_mnist", "run.knn_limit=200")
    )
    assert trainer.step == 4  # nothing left to do
    acc = knn_of_backbone(trainer.model.teacher.backbone, trainer.cfg, trainer.device)
    assert 10.0 < acc <= 100.0


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    Trainer(tiny_config(tmp_path, "train.max_steps=1")).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"run\.resume=true"):
        Trainer(tiny_config(tmp_path, "run.resume=false"))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_online_knn_is_logged(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, "train.max_steps=2", "run.knn_every=2", "run.knn_dataset=fashion_mnist", "run.knn_limit=100"
    )
    Trainer(cfg).fit()
    assert "knn_top1" in (tmp_path / "metrics.jsonl").read_text()


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    Trainer(tiny_config(tmp_path, "train.max_steps=3")).fit()
    before = _final_state(tmp_path)
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=6"))
    with torch.no_grad():
        trainer.model.student.head.mlp[0].weight.fill_(float("nan"))  # type: ignore[index]
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss_\w+ is non-finite"):
        trainer.fit()
    _assert_same_run(before, _final_state(tmp_path))


def test_nan_batch_is_skipped_when_asked_and_never_reaches_memory(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(tmp_path, "train.max_steps=4", "train.on_nan=skip", "data.augment_on=device")
    )
    poison(trainer, 1)
    trainer.fit()
    assert trainer.step == 4
    assert torch.isfinite(trainer.objective.cls_bank.embeddings).all()
    assert all(torch.isfinite(p).all() for p in trainer.model.student.parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_steps"] for r in rows) == 1


def test_nan_weights_never_reach_a_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=2", "train.on_nan=skip"))
    banks = trainer.objective.cls_bank.embeddings.clone()
    with torch.no_grad():
        trainer.model.student.head.mlp[0].weight.fill_(float("nan"))  # type: ignore[index]
    with pytest.raises(CheckpointError, match="NaN"):
        trainer.fit()
    assert torch.equal(trainer.objective.cls_bank.embeddings, banks)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("train.batch_size=0", "train.batch_size: must be > 0"),
        ("train.lr=-1", "train.lr: must be > 0"),
        ("sop.cls_k=100", "sop.cls_k"),
        ("sop.cls_anchors=100", "sop.cls_anchors"),
        ("data.local_size=32", "data.local_size: must be <= global_size"),
        ("data.global_scale=[0.8,0.2]", "data.global_scale: must be a pair"),  # checked by MultiCropSpec
        ("data.in_chans=2", "data.in_chans: must be 1 (grayscale) or 3 (RGB)"),
        ("train.epochs=abc", "train.epochs"),
    ],
)
def test_config_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    from tests.train.tiny import TINY

    assert main(["pretrain", *TINY, f"run.output_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_impossible_model_sizes_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.train.tiny import TINY

    assert (
        main(["pretrain", *TINY, f"run.output_dir={tmp_path}", "model.embed_dim=30", "model.num_heads=4"])
        == 2
    )
    assert "model:" in capsys.readouterr().err


def test_missing_dataset_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.train.tiny import TINY

    missing = tmp_path / "nowhere"
    args = [*TINY, "data.dataset=folder", f"data.path={missing}", f"run.output_dir={tmp_path / 'run'}"]
    assert main(["pretrain", *args]) == 2
    assert str(missing) in capsys.readouterr().err


def test_resume_into_a_run_of_another_architecture_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.train.tiny import TINY

    Trainer(tiny_config(tmp_path, "train.max_steps=1")).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    args = [
        *TINY,
        f"run.output_dir={tmp_path}",
        "model.arch=vit_demo",
        "model.embed_dim=32",
        "model.num_heads=2",
    ]
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.arch" in err and "vit_test" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_default_config_type() -> None:
    assert isinstance(tiny_config(Path("/tmp/x")), PretrainConfig)


@pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")
def test_corrupt_images_in_a_folder_are_skipped_and_counted(tmp_path: Path) -> None:
    from PIL import Image

    from sopvit.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("train", limit=40)
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
    (folder / "000.png").write_bytes((folder / "000.png").read_bytes()[:40])  # truncated
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    cfg = tiny_config(
        tmp_path / "run",
        "data.dataset=folder",
        f"data.path={tmp_path / 'images'}",
        "data.limit=null",
        "train.max_steps=2",
        "data.augment_on=workers",
    )
    with pytest.warns(UserWarning, match=r"\d+ unreadable image file\(s\) were skipped"):
        Trainer(cfg).fit()
    assert _final_state(tmp_path / "run")["skipped_files"] >= 1
