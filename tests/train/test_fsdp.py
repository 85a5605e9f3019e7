"""``train.parallel=fsdp``: 2 sharded gloo ranks train like one process fed the same global batch, the
EMA runs on local shards, and sharded checkpoints resume exactly on 2 ranks and closely on 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.tensor import DTensor

from sopvit.checkpoints import sharded
from sopvit.checkpoints.checkpoint import CheckpointError
from sopvit.checkpoints.run_dir import latest_checkpoint, read_checkpoint
from sopvit.config import ConfigError
from sopvit.train.trainer import Trainer
from tests.gloo import run_gloo_ranks
from tests.train.tiny import tiny_config

STEPS = 5  # with freeze_last_layer=0.25 (2 of 8 steps) the DINO-family prototypes move from step 3
# Drop path and KoLeo are per rank by design (tests/train/test_distributed_train.py); both are off here.
EXACT = ["run.log_every=1", "data.mask_prob=0.5", "data.mask_ratio=[0.1,0.5]", "sop.koleo_weight=0"]


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x.detach().clone()


def _record(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Every step's whole gradients, taken just before the optimizer applies them."""
    grads: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording(*args: Any, **kwargs: Any) -> Any:
        named = trainer.model.student.named_parameters()
        grads.append({n: _full(p.grad) for n, p in named if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording  # type: ignore[method-assign]
    return grads


def _train(run_dir: Path, out: Path | None, *overrides: str) -> None:
    trainer = Trainer(tiny_config(run_dir, *EXACT, *overrides))
    grads = _record(trainer)
    trainer.fit()
    result = {
        "grads": grads,
        "teacher": {k: _full(v) for k, v in trainer.model.teacher.state_dict().items()},
        "student": {k: _full(v) for k, v in trainer.model.student.state_dict().items()},
        "objective": {k: v.clone() for k, v in trainer.objective.state_dict().items() if torch.is_tensor(v)},
        "sharded": [type(p).__name__ for p in trainer.model.teacher.parameters()],
    }
    if out is not None:
        torch.save(result, out)


def _rank(rank: int, run_dir: Path, out: Path, overrides: tuple[str, ...]) -> None:
    _train(run_dir, out if rank == 0 else None, *overrides)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max())), msg=what)


METHODS = {
    "sop": (),
    # The DINO-family heads end in learned prototypes whose last layer stays frozen for the first steps.
    "ibot": ("method=ibot", "ibot.out_dim=64", "ibot.freeze_last_layer=0.25"),
    "dino": ("method=dino", "dino.out_dim=64", "dino.freeze_last_layer=0.25"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_sharded_ranks_train_like_one_process(tmp_path: Path, method: str) -> None:
    steps = f"train.max_steps={STEPS}"
    _train(tmp_path / "one", tmp_path / "one.pt", steps, "train.batch_size=16", *METHODS[method])
    args = (steps, "train.batch_size=8", "train.parallel=fsdp", *METHODS[method])
    run_gloo_ranks(_rank, 2, tmp_path / "two", tmp_path / "two.pt", args)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert set(two["sharded"]) == {"DTensor"}  # the teacher is sharded too
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert len(two["grads"]) == len(one["grads"]) == STEPS
    # A sum instead of a mean over ranks (pytorch issue 162338) would double every gradient.
    for step, (g2, g1) in enumerate(zip(two["grads"], one["grads"])):
        assert g2.keys() == g1.keys()
        for name in g1:
            _close(g2[name], g1[name], f"step {step} grad {name}")
    for part in ("teacher", "student", "objective"):
        for key, value in one[part].items():
            if value.is_floating_point():
                _close(two[part][key], value, f"{part}.{key}")
            else:
                assert torch.equal(two[part][key], value), (part, key)


def _checkpoint(run_dir: Path) -> dict[str, Any]:
    path = latest_checkpoint(run_dir)
    assert path is not None and path.is_dir(), f"{run_dir} holds no sharded checkpoint"
    return read_checkpoint(path)


def _fit_rank(rank: int, run_dir: Path, overrides: tuple[str, ...]) -> None:
    Trainer(tiny_config(run_dir, *overrides)).fit()


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_exactly_on_two_ranks_and_closely_on_one(tmp_path: Path) -> None:
    # Every source of randomness on: drop path (each rank's stream), KoLeo, random masks.
    common = ("train.parallel=fsdp", "train.batch_size=8", "model.drop_path_rate=0.3", "run.log_every=1")
    run_gloo_ranks(_fit_rank, 2, tmp_path / "straight", (*common, "train.max_steps=5"))
    run_gloo_ranks(_fit_rank, 2, tmp_path / "resumed", (*common, "train.max_steps=3"))
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-000003"]
    run_gloo_ranks(_fit_rank, 2, tmp_path / "resumed", (*common, "train.max_steps=5"))
    straight, resumed = _checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 5 and len(resumed["rng"]) == 2
    for part in ("student", "teacher", "objective"):
        for key, value in straight[part].items():
            if torch.is_tensor(value):
                assert torch.equal(resumed[part][key], value), (part, key)
    # The same run continued by one process accumulating 2 micro-batches: the same global batch.
    exact = (*EXACT, "train.parallel=fsdp", "train.batch_size=8")
    run_gloo_ranks(_fit_rank, 2, tmp_path / "two", (*exact, "train.max_steps=5"))
    run_gloo_ranks(_fit_rank, 2, tmp_path / "resharded", (*exact, "train.max_steps=3"))
    Trainer(tiny_config(tmp_path / "resharded", *exact, "train.max_steps=5", "train.accum_steps=2")).fit()
    two, resharded = _checkpoint(tmp_path / "two"), _checkpoint(tmp_path / "resharded")
    assert len(resharded["rng"]) == 1 and resharded["step"] == 5
    assert _losses(tmp_path / "resharded")[3:] == pytest.approx(_losses(tmp_path / "two")[3:], rel=1e-4)
    for key, value in two["teacher"].items():
        torch.testing.assert_close(resharded["teacher"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def _sharded_step(rank: int, run_dir: Path, out: Path, overrides: tuple[str, ...]) -> None:
    trainer = Trainer(tiny_config(run_dir, *EXACT, *overrides))
    trainer.fit()
    params = list(trainer.model.student.parameters()) + list(trainer.model.teacher.parameters())
    mesh = {p.device_mesh.device_type for p in params if isinstance(p, DTensor)}
    result = {
        "types": {type(p).__name__ for p in params},
        "devices": {p.device.type for p in params},
        "mesh": mesh,
        "teacher": {k: _full(v) for k, v in trainer.model.teacher.state_dict().items()},
    }
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
def test_checkpointing_and_compile_compose_with_sharding(tmp_path: Path) -> None:
    """The three wrappers in torchtitan's order on 2 gloo ranks: the same teacher as plain sharding, and
    every parameter stays a CPU DTensor on a CPU mesh (a gloo group must not move them to CUDA,
    pytorch issue 132471)."""
    common = ("train.max_steps=2", "train.batch_size=8", "train.parallel=fsdp")
    run_gloo_ranks(_sharded_step, 2, tmp_path / "plain", tmp_path / "plain.pt", common)
    wrapped = (*common, "train.activation_checkpointing=true", "train.compile=true")
    run_gloo_ranks(_sharded_step, 2, tmp_path / "wrapped", tmp_path / "wrapped.pt", wrapped)
    plain, both = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("plain", "wrapped"))
    for result in (plain, both):
        assert result["types"] == {"DTensor"} and result["devices"] == result["mesh"] == {"cpu"}
    assert _losses(tmp_path / "wrapped") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-4)
    for key, value in plain["teacher"].items():
        torch.testing.assert_close(both["teacher"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_sharded_save_cut_short_leaves_the_previous_checkpoint_named_and_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = ("train.parallel=fsdp", "train.max_steps=6", "run.checkpoint_every=3")
    trainer = Trainer(tiny_config(tmp_path, *flags))
    publish = sharded.os.replace
    saves = []

    def crash_on_second(src: Any, dst: Any) -> None:
        if Path(src).name.endswith(".tmp-dcp"):
            saves.append(dst)
            if len(saves) == 2:
                raise OSError(28, "No space left on device")
        publish(src, dst)

    monkeypatch.setattr(sharded.os, "replace", crash_on_second)
    with pytest.raises(CheckpointError, match=r"checkpoint-000006.*No space left.*previous checkpoint"):
        trainer.fit()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.latest").read_text() == "checkpoint-000003"
    assert (tmp_path / ".checkpoint-000006.tmp-dcp").is_dir()  # the part written, never named
    assert read_checkpoint(latest_checkpoint(tmp_path))["step"] == 3  # type: ignore[arg-type]
    resumed = Trainer(tiny_config(tmp_path, *flags))
    assert resumed.step == 3 and not (tmp_path / ".checkpoint-000006.tmp-dcp").exists()
    resumed.fit()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000006"]


@pytest.mark.parametrize(
    ("override", "named"),
    [("method=ibot", "method=sop"), ("model.arch=vit_tiny_patch16_224", "model.arch=vit_test")],
)
def test_a_sharded_checkpoint_of_another_method_or_shape_is_refused_in_one_line(
    tmp_path: Path, override: str, named: str
) -> None:
    Trainer(tiny_config(tmp_path, "train.parallel=fsdp", "train.max_steps=1")).fit()
    with pytest.raises(ConfigError, match=f"trained with {named}") as err:
        Trainer(tiny_config(tmp_path, "train.parallel=fsdp", override))
    assert "\n" not in str(err.value)


def test_a_run_changes_format_with_its_parallel_mode_and_keeps_one(tmp_path: Path) -> None:
    """A ddp stretch writes checkpoint.pt and an fsdp stretch a sharded directory; each save removes the
    other format, and either resumes the run."""
    Trainer(tiny_config(tmp_path, "train.max_steps=2", "run.checkpoint_every=1")).fit()
    assert (tmp_path / "checkpoint.pt").is_file()
    Trainer(tiny_config(tmp_path, "train.max_steps=3", "train.parallel=fsdp")).fit()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000003"
    assert not (tmp_path / "checkpoint.pt").exists()
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=4"))
    assert trainer.step == 3
    trainer.fit()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "checkpoint.latest").exists()


SWIN = (
    "model.arch=swin_tiny_patch4_window7_224",
    "data.global_size=64",
    "data.local_size=32",
    "train.max_steps=1",
)


@pytest.mark.slow
def test_swin_is_sharded_stage_by_stage_and_trains_like_one_process(tmp_path: Path) -> None:
    _train(tmp_path / "one", tmp_path / "one.pt", *SWIN, "train.batch_size=4")
    args = (*SWIN, "train.batch_size=2", "train.parallel=fsdp")
    run_gloo_ranks(_rank, 2, tmp_path / "two", tmp_path / "two.pt", args)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert set(two["sharded"]) == {"DTensor"}
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    for key, value in one["teacher"].items():
        _close(two["teacher"][key], value, f"teacher.{key}", rel=1e-4)


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_a_sharded_checkpoint_taken_while_the_prototypes_are_frozen_resumes_exactly(
    tmp_path: Path, method: str
) -> None:
    """Frozen parameters have no optimizer state yet; the resumed run must not invent one."""
    flags = ("train.parallel=fsdp", "model.drop_path_rate=0.1", *METHODS[method])
    Trainer(tiny_config(tmp_path / "straight", *flags, "train.max_steps=3")).fit()
    Trainer(tiny_config(tmp_path / "resumed", *flags, "train.max_steps=1")).fit()
    Trainer(tiny_config(tmp_path / "resumed", *flags, "train.max_steps=3")).fit()
    straight, resumed = _checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "resumed")
    for part in ("student", "teacher", "objective"):
        for key, value in straight[part].items():
            if torch.is_tensor(value):
                assert torch.equal(resumed[part][key], value), (part, key)


def _bf16_rank(rank: int, run_dir: Path, out: Path) -> None:
    flags = ("train.parallel=fsdp", "train.precision=bf16", "train.max_steps=1")
    trainer = Trainer(tiny_config(run_dir, *flags))
    seen: list[torch.dtype] = []
    block = trainer.model.student.backbone.model.blocks[0]
    block.register_forward_pre_hook(lambda module, args: seen.append(module.attn.qkv.weight.dtype))
    row = trainer.fit()
    masters = {p.dtype for p in trainer.model.student.parameters()}
    if rank == 0:
        torch.save({"seen": seen, "masters": masters, "loss": row["loss"]}, out)


@pytest.mark.slow
def test_bf16_runs_on_bf16_parameters_over_float32_shards(tmp_path: Path) -> None:
    run_gloo_ranks(_bf16_rank, 2, tmp_path, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert set(out["seen"]) == {torch.bfloat16}  # FSDP gathers bf16 copies for compute
    assert out["masters"] == {torch.float32}  # the sharded weights the optimizer updates stay float32
    assert torch.isfinite(torch.tensor(out["loss"]))


@pytest.mark.slow
def test_a_single_file_checkpoint_continues_sharded_on_two_ranks(tmp_path: Path) -> None:
    """checkpoint.pt (one process, ddp) -> 2 sharded ranks with the same global batch: the optimizer state
    is matched to its parameters by name and split into shards."""
    Trainer(tiny_config(tmp_path / "straight", *EXACT, "train.max_steps=4")).fit()
    Trainer(tiny_config(tmp_path / "grown", *EXACT, "train.max_steps=2")).fit()
    assert (tmp_path / "grown" / "checkpoint.pt").is_file()
    sharded_args = (*EXACT, "train.max_steps=4", "train.batch_size=8", "train.parallel=fsdp")
    # The online k-NN runs the sharded teacher's backbone on its own, on every rank.
    knn = ("run.knn_every=4", "run.knn_dataset=fashion_mnist", "run.knn_limit=64")
    run_gloo_ranks(_fit_rank, 2, tmp_path / "grown", (*sharded_args, *knn))
    rows = [json.loads(line) for line in (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [4]
    grown = _checkpoint(tmp_path / "grown")
    straight = read_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert grown["step"] == 4
    losses = [r["loss"] for r in rows if "loss" in r][2:]
    assert losses == pytest.approx(_losses(tmp_path / "straight")[2:], rel=1e-4)
    for key, value in straight["teacher"].items():
        torch.testing.assert_close(grown["teacher"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_shard_that_cannot_be_written_is_one_line_and_the_previous_checkpoint_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = ("train.parallel=fsdp", "train.max_steps=6", "run.checkpoint_every=3")
    trainer = Trainer(tiny_config(tmp_path, *flags))
    write = FileSystemWriter.write_data
    calls = []

    def full_disk(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(CheckpointError, match=r"checkpoint-000006: No space left on device\. The previous"):
        trainer.fit()
    assert (tmp_path / "checkpoint.latest").read_text() == "checkpoint-000003"
