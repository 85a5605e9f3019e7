"""The ways a cluster starts ranks give one and the same run: torchrun on one node, torchrun on two "nodes"
(two agents meeting through a c10d rendezvous on this machine), and srun's Slurm variables without torchrun.
A run also continues on another world size with the same global batch (2 ranks -> 1 rank, 2 micro-batches).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import load_checkpoint
from tests.train.test_end_to_end import _assert_same_run
from tests.train.tiny import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SOPVIT_DIST_TIMEOUT": "120"}
ARGS = [*TINY, "train.batch_size=8", "run.log_every=1", "data.augment_on=workers"]
PRETRAIN = ["-m", "sopvit", "pretrain"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(procs: list[subprocess.Popen[str]]) -> None:
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out or "")[-2000:] + (err or "")[-3000:]


def _start(cmd: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [*ARGS, f"train.max_steps={steps}", f"run.output_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``torchrun --nproc-per-node 2`` on one node, 6 steps."""
    run_dir = tmp_path_factory.mktemp("cluster") / "reference"
    _wait([_start([*TORCHRUN, "--standalone", "--nproc-per-node=2", *PRETRAIN, *_args(run_dir, 6)])])
    return run_dir


def _same_as(reference: Path, run_dir: Path) -> None:
    _assert_same_run(load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(run_dir / "checkpoint.pt"))


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(reference: Path, tmp_path: Path) -> None:
    port, run_dir = _free_port(), tmp_path / "two_nodes"
    nodes = [
        _start(
            [
                *TORCHRUN,
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=sopvit-test",
                *PRETRAIN,
                *_args(run_dir, 6),
            ]
        )
        for node in (0, 1)
    ]
    _wait(nodes)
    _same_as(reference, run_dir)


@pytest.mark.slow
def test_srun_tasks_start_the_group_from_slurm_variables(reference: Path, tmp_path: Path) -> None:
    """What ``srun --ntasks 2 python -m sopvit pretrain ...`` sets, by hand and without torchrun."""
    run_dir = tmp_path / "srun"
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242"}
    tasks = [
        _start(
            [sys.executable, *PRETRAIN, *_args(run_dir, 6)],
            **slurm,
            SLURM_PROCID=str(task),
            SLURM_LOCALID=str(task),
            MASTER_PORT=str(port),
        )
        for task, port in zip((0, 1), [_free_port()] * 2)
    ]
    _wait(tasks)
    _same_as(reference, run_dir)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_two_ranks_resume_on_one_with_two_micro_batches(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "shrunk"
    _wait([_start([*TORCHRUN, "--standalone", "--nproc-per-node=2", *PRETRAIN, *_args(run_dir, 3)])])
    _wait([_start([sys.executable, *PRETRAIN, *_args(run_dir, 6, "train.accum_steps=2")])])
    straight, shrunk = (load_checkpoint(d / "checkpoint.pt") for d in (reference, run_dir))
    assert shrunk["step"] == 6
    # The same images in the same steps, in the same order: the memories hold the same sample ids.
    for key in ("cls_bank.sample_ids", "patch_bank.sample_ids"):
        assert torch.equal(shrunk["objective"][key], straight["objective"][key])
    # Sums run in another order (DDP's all-reduce vs accumulation): equal within float tolerance.
    for key, value in straight["teacher"].items():
        torch.testing.assert_close(shrunk["teacher"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    expected, got = _losses(reference), _losses(run_dir)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
