"""``sopvit bench --memory``: the per-rank byte counts agree with themselves (FSDP at 1 rank is DDP, 2 ranks
hold half) and with what FSDP2 really allocates on 2 gloo ranks; the command prints its tables and refuses
bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from sopvit.bench import run_one_step
from sopvit.bench_memory import DEFAULT_RECIPE, measure_child, memory_rows, shard_numel
from sopvit.cli import main
from sopvit.recipe.build import build_model
from sopvit.recipe.config import load_pretrain_config
from sopvit.train.trainer import Trainer
from tests.gloo import run_gloo_ranks
from tests.train.tiny import TINY, tiny_config


def _vit_small() -> object:
    return load_pretrain_config(DEFAULT_RECIPE, ["data.path=-"])


def test_shard_numel_pads_dim_zero() -> None:
    assert shard_numel((7, 3), 2) == 4 * 3
    assert shard_numel((1, 197, 384), 8) == 197 * 384  # a dim 0 of 1: every rank holds (padded) all of it
    assert shard_numel((), 4) == 1


@pytest.mark.parametrize("cfg", [_vit_small(), tiny_config(Path("unused"))], ids=["vit_small", "tiny"])
def test_fsdp_on_one_rank_is_ddp_and_two_ranks_hold_half(cfg) -> None:  # type: ignore[no-untyped-def]
    (ddp,) = memory_rows(cfg, "ddp", [1], 4)
    fsdp1, fsdp2 = memory_rows(cfg, "fsdp", [1, 2], 4)
    assert (fsdp1.params, fsdp1.grads, fsdp1.adamw, fsdp1.teacher, fsdp1.banks) == (
        ddp.params,
        ddp.grads,
        ddp.adamw,
        ddp.teacher,
        ddp.banks,
    )
    assert fsdp1.total == ddp.total and fsdp1.gathered == ddp.gathered == 0
    with torch.device("meta"):
        block = build_model(cfg).student.backbone.shard_units()[0]
    block_bytes = sum(p.numel() * 4 for p in block.parameters())
    assert fsdp2.params <= ddp.params / 2 + block_bytes
    assert fsdp2.total < ddp.total and fsdp2.gathered > 0 and fsdp2.banks == ddp.banks


def _sharded_rank(rank: int, run_dir: Path, out: Path) -> None:
    trainer = Trainer(tiny_config(run_dir, "train.parallel=fsdp"))
    params = list(trainer.model.student.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    for p in params:  # any gradient: AdamW creates its state on the first step
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    local = {
        "params": sum(p.to_local().numel() * 4 for p in params),
        # FSDP2's own storage of each shard, padded to ceil(dim0 / world) rows on every rank
        "padded": sum(p.to_local().untyped_storage().nbytes() for p in params),
        "teacher": sum(p.to_local().numel() * 4 for p in trainer.model.teacher.parameters()),
        "adamw": sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in state),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(local))


@pytest.mark.slow
def test_the_formula_is_what_fsdp2_allocates_on_two_ranks(tmp_path: Path) -> None:
    run_gloo_ranks(_sharded_rank, 2, tmp_path / "run", tmp_path)
    (row,) = memory_rows(tiny_config(tmp_path / "run"), "fsdp", [2], 4)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Rank 0's shards are the ceil(dim0 / 2)-row chunks; rank 1's may be shorter, but its storage is padded.
    assert ranks[0]["params"] == row.params and ranks[0]["teacher"] == row.teacher
    assert ranks[0]["adamw"] == row.adamw
    assert ranks[1]["params"] < row.params  # the tiny model has dim-0 sizes of 1 (the [CLS] token...)
    assert ranks[0]["padded"] == ranks[1]["padded"] == row.params


def test_cli_prints_a_markdown_table_and_the_fits(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--memory", "--markdown", "--arch", "vit_test", "--world-sizes", "1,2,8,64", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| arch | parallel | ranks | params | grads | adamw | teacher | banks | total | gathered |" in out
    assert "| vit_test | fsdp | 8 |" in out and "| vit_test | ddp | 64 |" in out
    assert "| vit_test | fsdp | 2 |" not in out  # the markdown shows 1, 8 and 64 ranks
    assert "activations NOT included" in out and "80 GB card:" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--world-sizes", "0"], "world sizes must be integers >= 1"), (["--arch", "vit_nope"], "unknown arch")],
)
def test_bad_input_is_one_line(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--memory", *extra, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_measured_step_reports_a_peak_above_the_baseline() -> None:
    result = measure_child(tiny_config(Path("unused"), "train.device=cpu"), run_one_step)
    assert result["device"] == "cpu" and result["what"] == "peak RSS"
    assert result["peak"] >= result["baseline"] > 0 and result["seconds"] > 0
