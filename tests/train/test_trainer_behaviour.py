"""The trainer's wiring pinned: the schedules it derives from the config, what it logs and checkpoints
when, the run directory it prepares, and how it resumes (other world sizes and older checkpoints too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sopvit.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from sopvit.config import ConfigError
from sopvit.train import trainer as trainer_module
from sopvit.train.resume import check_compatible
from sopvit.train.schedules import Schedules
from sopvit.train.trainer import Trainer
from tests.train.tiny import edit_batches, poison, tiny_config

# tiny_config: 128 images, 16 per micro-batch -> 8 micro-batches an epoch, 2 epochs.


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_schedules_follow_the_config_and_the_global_batch(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(
            tmp_path,
            "train.accum_steps=2",
            "train.lr=0.004",
            "train.min_lr=1e-5",
            "train.warmup_epochs=0.5",
            "train.weight_decay=0.04",
            "train.weight_decay_end=0.4",
            "train.momentum=0.99",
            "train.momentum_end=1.0",
            "train.teacher_temp=0.06",
            "train.warmup_teacher_temp=0.03",
            "train.warmup_teacher_temp_epochs=1.5",
            "train.patch_teacher_temp=0.05",
        )
    )
    # 4 steps an epoch (8 micro-batches / 2); lr scaled by the global batch 16 x 1 rank x 2 / 256
    assert trainer.schedules == Schedules(
        total_steps=8,
        lr=0.004 * 32 / 256,
        min_lr=1e-5,
        warmup_steps=2,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum=0.99,
        momentum_end=1.0,
        teacher_temp=0.06,
        warmup_teacher_temp=0.03,
        teacher_temp_warmup_steps=6,
        patch_teacher_temp=0.05,
    )
    assert trainer.total_steps == trainer.stop_step == 8


def test_accumulation_may_fill_one_epoch_but_not_more(tmp_path: Path) -> None:
    assert Trainer(tiny_config(tmp_path / "a", "train.accum_steps=8")).total_steps == 2
    with pytest.raises(ValueError, match=r"train\.accum_steps=9 exceeds the 8 micro-batches"):
        Trainer(tiny_config(tmp_path / "b", "train.accum_steps=9"))


def test_cpu_training_uses_explicit_attention_in_both_encoders(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path))
    flags = [m.fused_attn for m in trainer.model.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == 2 * 2 and not any(flags)  # vit_test: 2 blocks, student and teacher


def test_compile_compiles_every_block_of_both_encoders_in_place(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.compile=true"))  # compiles lazily: nothing runs here
    assert (
        trainer.ctx.parallel.student is trainer.student is trainer.model.student
    )  # the step calls the module itself
    for encoder in (trainer.model.student, trainer.model.teacher):
        blocks = list(encoder.backbone.model.blocks)
        assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert (
        trainer.model.student.state_dict().keys()
        == Trainer(tiny_config(tmp_path / "eager")).model.student.state_dict().keys()
    )
    assert trainer.ctx.device == torch.device("cpu") and trainer.ctx.autocast_dtype is None
    assert (
        Trainer(tiny_config(tmp_path / "bf16", "train.precision=bf16")).ctx.autocast_dtype == torch.bfloat16
    )


def test_the_run_directory_is_created_cleaned_and_described(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "a" / "b"
    run_dir.mkdir(parents=True)
    (run_dir / ".checkpoint.pt.tmp-1234").write_bytes(b"cut short")  # a save killed mid-write
    Trainer(tiny_config(run_dir))
    assert not (run_dir / ".checkpoint.pt.tmp-1234").exists()
    assert (run_dir / "config.yaml").read_text().count("vit_test") == 1
    Trainer(tiny_config(tmp_path / "new" / "nested"))
    assert (tmp_path / "new" / "nested" / "config.yaml").exists()


def test_fit_logs_checkpoints_and_evaluates_on_its_cadences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(
        tiny_config(
            tmp_path,
            "train.max_steps=7",
            "run.checkpoint_every=3",
            "run.knn_every=2",
            "run.knn_dataset=fashion_mnist",
            "run.log_every=2",
        )
    )
    saved: list[int] = []
    save = trainer.save

    def record_save() -> None:
        saved.append(trainer.step)
        save()

    monkeypatch.setattr(trainer, "save", record_save)
    monkeypatch.setattr(trainer, "online_knn", lambda: {"knn_top1": float(trainer.step)})
    monitors: list[tuple[Any, ...]] = []
    monitor_class = trainer_module.Monitor

    def monitor(*args: Any) -> Any:
        monitors.append(args[1:])
        return monitor_class(*args)

    monkeypatch.setattr(trainer_module, "Monitor", monitor)
    last = trainer.fit()

    assert saved == [3, 6, 7]  # every checkpoint_every steps, and the last step
    # total steps, first step, images (not crops) a step, log_every, main process, tensorboard, progress
    assert monitors == [(7, 0, 16, 2, True, False, False)]
    rows = _rows(tmp_path)
    assert [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r] == [(2, 2.0), (4, 4.0), (6, 6.0)]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 7]
    values = trainer.schedules.at(6)  # the 7th step
    assert logged[-1]["lr"] == values.lr and logged[-1]["weight_decay"] == values.weight_decay
    assert logged[-1]["momentum"] == values.momentum and logged[-1]["teacher_temp"] == values.teacher_temp
    assert last == {k: v for k, v in logged[-1].items() if k != "step"}


def test_a_resumed_fit_runs_only_the_remaining_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Trainer(tiny_config(tmp_path, "train.max_steps=3")).fit()
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=5", "run.resume=true"))
    steps: list[int] = []
    step = trainer_module.train_step

    def record_step(ctx: Any, batches: Any, values: Any, n: int) -> dict[str, torch.Tensor]:
        steps.append(n)
        return step(ctx, batches, values, n)

    monkeypatch.setattr(trainer_module, "train_step", record_step)
    trainer.fit()
    assert steps == [3, 4] and trainer.step == 5


def test_a_non_finite_loss_names_the_step_it_happened_in(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3", "data.augment_on=device"))
    poison(trainer, 2)
    with pytest.raises(RuntimeError, match=r"^step 2: loss"):
        trainer.fit()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_skipped_files_add_up_over_steps_and_resumes(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3", "data.augment_on=device"))

    def lossy(m: int, batch: Any) -> None:
        batch.skipped = 2

    edit_batches(trainer, lossy)
    with pytest.warns(UserWarning, match="6 unreadable image file"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["skipped_files"] == 6
    resumed = Trainer(tiny_config(tmp_path, "train.max_steps=4", "run.resume=true"))
    assert resumed.skipped_files == 6
    fresh = Trainer(tiny_config(tmp_path / "fresh"))
    assert fresh.skipped_files == 0


def test_online_knn_reports_only_a_finite_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sopvit.train.online_knn as online

    trainer = Trainer(tiny_config(tmp_path))
    monkeypatch.setattr(online, "knn_of_backbone", lambda *args, **kwargs: 61.5)
    assert trainer.online_knn() == {"knn_top1": 61.5}
    monkeypatch.setattr(online, "knn_of_backbone", lambda *args, **kwargs: float("nan"))
    assert trainer.online_knn() == {}


def test_a_saved_config_missing_a_section_or_the_config_is_refused_by_name(tmp_path: Path) -> None:
    current = {"method": "sop", "model": {"arch": "vit_test"}, "data": {}, "sop": {}}
    with pytest.raises(ConfigError, match=r"model\.arch=None"):
        check_compatible({"data": {}, "sop": {}}, current, tmp_path / "checkpoint.pt")
    Trainer(tiny_config(tmp_path, "train.max_steps=1")).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    del state["config"]
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"with model\.arch=None"):
        Trainer(tiny_config(tmp_path, "run.resume=true"))


def _rewrite_rng(run_dir: Path, rng: Any) -> None:
    state = load_checkpoint(run_dir / "checkpoint.pt")
    state["rng"] = rng
    save_checkpoint(state, run_dir / "checkpoint.pt")


def test_resuming_on_another_world_size_continues_rank_0_and_reseeds_torch(tmp_path: Path) -> None:
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).fit()
    rank_0 = load_checkpoint(tmp_path / "checkpoint.pt")["rng"][0]
    np.random.seed(99)
    rank_1 = {**rank_0, "numpy": np.random.get_state(), "torch": torch.manual_seed(98).get_state()}
    _rewrite_rng(tmp_path, [rank_0, rank_1])  # as written by 2 ranks; resumed here by 1

    resumed = Trainer(tiny_config(tmp_path, "run.resume=true"))
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    assert resumed.step == 2
    assert np.array_equal(numpy_state[1], rank_0["numpy"][1])  # rank 0's streams continue...
    assert not torch.equal(torch_state, rank_0["torch"])  # ...but torch's is reseeded for (seed, step, rank)
    Trainer(tiny_config(tmp_path, "run.resume=true"))
    assert torch.equal(torch.get_rng_state(), torch_state)  # reproducibly


def test_a_checkpoint_with_one_rng_state_dict_still_resumes(tmp_path: Path) -> None:
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).fit()
    rank_0 = load_checkpoint(tmp_path / "checkpoint.pt")["rng"][0]
    _rewrite_rng(tmp_path, rank_0)  # format written before every rank's states were kept
    torch.manual_seed(0)
    Trainer(tiny_config(tmp_path, "run.resume=true"))
    assert torch.equal(torch.get_rng_state(), rank_0["torch"])


def _config(method: str | None, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny config as a checkpoint stores it, with ``method`` (None: absent) and section values."""
    from sopvit.config import config_to_dict

    config = config_to_dict(tiny_config(Path("unused"), "sop.dim=32", "ibot.out_dim=64", "dino.out_dim=64"))
    for name, values in sections.items():
        config[name] = {**config[name], **values}
    if method is None:
        del config["method"]
    else:
        config["method"] = method
    return config


def test_resuming_needs_the_same_method_and_that_methods_shapes(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    check_compatible(_config(None), _config("sop"), path)  # written before `method` existed: a SOP run
    with pytest.raises(ConfigError, match=r"method=sop, this config has ibot") as err:
        check_compatible(_config(None), _config("ibot"), path)
    assert err.value.key == "method"
    with pytest.raises(ConfigError, match=r"method=dino, this config has ibot"):
        check_compatible(_config("dino"), _config("ibot"), path)
    # only the running method's section fixes shapes
    for method in ("sop", "ibot", "dino"):
        others = {name: {"dim": 16, "out_dim": 48} for name in ("sop", "ibot", "dino") if name != method}
        check_compatible(_config(method, **others), _config(method), path)
    with pytest.raises(ConfigError, match=r"sop\.cls_bank_size=16, this config has 64"):
        check_compatible(_config("sop", sop={"cls_bank_size": 16}), _config("sop"), path)
    # sop.dim follows model.head_bottleneck_dim, which the model's own keys compare
    check_compatible(_config("sop", sop={"dim": 32}), _config("sop"), path)
    for method in ("ibot", "dino"):
        with pytest.raises(ConfigError, match=rf"{method}\.out_dim=48, this config has 64"):
            check_compatible(_config(method, **{method: {"out_dim": 48}}), _config(method), path)


def test_a_fractional_epoch_count_ends_the_schedules_part_way_through_an_epoch(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.epochs=1.5"))  # 128 images / 16 = 8 steps an epoch
    assert trainer.total_steps == trainer.stop_step == 12
    assert trainer.schedules.at(11).lr < trainer.schedules.at(6).lr  # the cosine spans the 12 steps


def test_a_run_shorter_than_one_step_still_trains_one_uncompiled_unfrozen(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "train.epochs=0.05"))  # 0.05 x 8 steps rounds to 0
    assert trainer.total_steps == trainer.stop_step == 1
    # compile defaults to off: the step calls the student itself
    assert trainer.student is trainer.model.student and trainer.ctx.parallel.student is trainer.model.student
    assert trainer.ctx.frozen == {}  # only DINO-family heads freeze their last layer


def test_fit_counts_images_per_step_and_the_files_decoded_on_the_cpu_over_all_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    per_step: list[int] = []

    class Spy(trainer_module.Monitor):
        def __init__(self, run_dir: Path, total: int, start: int, images_per_step: int, *rest: Any) -> None:
            per_step.append(images_per_step)
            super().__init__(run_dir, total, start, images_per_step, *rest)

    monkeypatch.setattr(trainer_module, "Monitor", Spy)
    trainer = Trainer(tiny_config(tmp_path, "train.accum_steps=2", "train.max_steps=2"))
    trainer.world = 2  # as on 2 ranks: fit reads the world size only to count images per step

    def cpu_decoded(m: int, batch: Any) -> None:
        batch.cpu_decoded = m + 1  # micro-batches 0..3: 1 + 2 + 3 + 4 files

    edit_batches(trainer, cpu_decoded)
    caplog.set_level("INFO", logger="sopvit.train.trainer")
    assert trainer.fit()
    assert per_step == [16 * 2 * 2]  # batch size x world x accumulation steps
    assert [r.getMessage() for r in caplog.records if "not JPEG" in r.getMessage()] == [
        "10 image file(s) were not JPEG and were decoded on the CPU"
    ]
    caplog.clear()
    # Nothing left to run: no row, and no file decoded on the CPU to report.
    assert trainer.fit() == {}
    assert not [r for r in caplog.records if "not JPEG" in r.getMessage()]
