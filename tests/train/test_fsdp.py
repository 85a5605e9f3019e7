"""``train.parallel=fsdp``: 2 sharded gloo ranks train like one process fed the same global batch, the
EMA runs on local shards, and sharded checkpoints resume exactly on 2 ranks and closely on 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from sopvit.checkpoints.run_dir import latest_checkpoint, read_checkpoint
from sopvit.train.trainer import Trainer
from tests.gloo import run_gloo_ranks
from tests.train.tiny import tiny_config

STEPS = 5
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


@pytest.mark.slow
def test_two_sharded_ranks_train_like_one_process(tmp_path: Path) -> None:
    steps = f"train.max_steps={STEPS}"
    _train(tmp_path / "one", tmp_path / "one.pt", steps, "train.batch_size=16")
    args = (steps, "train.batch_size=8", "train.parallel=fsdp")
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
