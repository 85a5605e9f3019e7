"""``sopvit pretrain``: build everything from a :class:`PretrainConfig`, then run the loop."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from sopvit import distributed as dist
from sopvit.checkpoints.checkpoint import CheckpointError
from sopvit.checkpoints.run_dir import latest_checkpoint
from sopvit.checkpoints.sharded import remove_stale
from sopvit.config import config_to_dict, save_config
from sopvit.data.pipeline import Batch, PretrainInputs
from sopvit.device import autocast_dtype, resolve_device
from sopvit.optim.groups import build_optimizer, set_schedule
from sopvit.recipe import PretrainConfig, build_model, build_objective
from sopvit.train.monitor import Monitor
from sopvit.train.parallel import prepare
from sopvit.train.resume import RunState, restore_rng, rng_state
from sopvit.train.schedules import Schedules
from sopvit.train.step import StepContext, train_step
from sopvit.train.stop import StopSignals, record_stop

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.device = dist.init_distributed(resolve_device(cfg.train.device).type)
        self.world, self.rank = dist.world_size(), dist.rank()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (teacher included)
        self.model = build_model(cfg).to(self.device)
        if self.device.type == "cpu":
            for encoder in (self.model.student, self.model.teacher):
                encoder.backbone.set_fused_attention(False)
        torch.manual_seed(cfg.train.seed + self.rank)  # drop-path differs per rank, as with more data
        patch_size = self.model.student.backbone.patch_size
        t = cfg.train
        self.inputs = PretrainInputs(
            cfg.data, patch_size, t.batch_size, self.world, self.rank, t.seed, t.accum_steps
        )
        # Any: callers (tests, the gallery) reach the method's own state, e.g. SOP's memories.
        self.objective: Any = build_objective(cfg, self.device)
        bf16 = autocast_dtype(t.precision, self.device) is not None
        self.parallel = prepare(self.model, t, self.device, self.world, bf16)
        self.student = self.parallel.student
        # After sharding: the optimizer holds the sharded parameters.
        self.optimizer = build_optimizer(self.model.student, self.device)
        self.run_state = RunState(
            self.model, self.optimizer, self.objective, self.parallel.sharded_checkpoints
        )
        steps_per_epoch = self.inputs.plan.steps_per_epoch // t.accum_steps
        self.total_steps = max(1, round(t.epochs * steps_per_epoch))
        self.stop_step = min(self.total_steps, t.max_steps or self.total_steps)
        global_batch = t.batch_size * self.world * t.accum_steps
        self.schedules = Schedules.for_run(t, steps_per_epoch, self.total_steps, global_batch)
        self.ctx = StepContext(
            self.model,
            self.parallel,
            self.objective,
            self.optimizer,
            self.device,
            autocast_dtype(t.precision, self.device),
            t.clip_grad,
            t.on_nan,
            {
                prefix: round(epochs * steps_per_epoch)
                for prefix, epochs in cfg.spec.frozen(cfg.method_config).items()
            },
        )
        self.run_dir = Path(cfg.run.output_dir)
        self.step = 0
        self.skipped_files = 0
        self.stopped_by: str | None = None  # the signal fit() stopped on, once it has saved
        self.signals_seen: set[str] = set()  # every stop signal this rank caught while fitting
        self.cpu_decoded = 0
        self._prepare_run_dir()

    def _prepare_run_dir(self) -> None:
        if dist.is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".*.tmp-*"):  # a write cut short by a kill; never a checkpoint
                if stale.is_file():
                    stale.unlink(missing_ok=True)
            remove_stale(self.run_dir)
        dist.barrier()
        path = latest_checkpoint(self.run_dir)
        if path is not None and not self.cfg.run.resume:
            raise ValueError(
                f"{self.run_dir} already holds a run ({path.name}); set run.resume=true to continue it "
                "or choose another run.output_dir (nothing was overwritten)"
            )
        if path is not None:
            self.load(path)
        if dist.is_main_process():
            save_config(self.cfg, self.run_dir / "config.yaml")

    def save(self) -> None:
        names, params = zip(*self.model.student.named_parameters(), strict=True)
        # Every rank agrees (one collective): under FSDP each checks only its own shards.
        local = torch.stack([torch.isfinite(dist.local_shard(p)).all() for p in params]).int()
        finite: list[int] = dist.all_reduce_min(local).tolist()
        if not all(finite):
            name = names[finite.index(0)]
            raise CheckpointError(f"refusing to checkpoint step {self.step}: student.{name} holds NaN/Inf")
        # Each rank draws its own drop-path stream: all of them are saved, or rank r > 0 would resume on
        # rank 0's stream and drift from the uninterrupted run.
        meta = {
            "step": self.step,
            "config": config_to_dict(self.cfg),
            "arch": self.cfg.model.arch,
            "skipped_files": self.skipped_files,
            "rng": dist.all_gather_objects(rng_state()),
        }
        self.run_state.save(self.run_dir, meta)

    def load(self, path: Path) -> None:
        meta = self.run_state.load(path, config_to_dict(self.cfg))
        self.step, self.skipped_files = int(meta["step"]), int(meta["skipped_files"])
        seed = self.cfg.train.seed + 1000 * self.step + self.rank
        restore_rng(meta["rng"], self.world, self.rank, seed)

    def fit(self) -> dict[str, float]:
        """Train from ``self.step`` to the end (or ``train.max_steps``), or until a stop signal (then
        ``self.stopped_by`` names it, after the checkpoint is saved); returns the last logged row."""
        cfg, accum = self.cfg, self.cfg.train.accum_steps
        monitor = Monitor(
            self.run_dir,
            self.stop_step,
            self.step,
            cfg.train.batch_size * self.world * accum,  # images (not crops) per step
            cfg.run.log_every,
            dist.is_main_process(),
            cfg.run.tensorboard,
            cfg.run.progress,
        )
        stream = self.inputs.batches(self.step * accum, self.stop_step * accum, self.device)
        self.cpu_decoded = 0
        try:
            with StopSignals(cfg.run.stop_signals) as signals:
                try:
                    last = self._steps(stream, monitor, signals)
                finally:
                    self.signals_seen |= signals.seen
        except BaseException as err:
            record_stop(self.run_dir, self.step, f"error {type(err).__name__}: {err}"[:500])
            raise
        finally:
            stream.close()  # stops a prefetching thread now, not whenever the generator is collected
            monitor.close()
            if self.cpu_decoded:
                logger.info("%d image file(s) were not JPEG and were decoded on the CPU", self.cpu_decoded)
            if self.skipped_files:
                warnings.warn(
                    f"{self.skipped_files} unreadable image file(s) were skipped during training",
                    stacklevel=2,
                )
        record_stop(self.run_dir, self.step, f"signal {self.stopped_by}" if self.stopped_by else "finished")
        return last

    def _steps(self, stream: Iterator[Batch], monitor: Monitor, signals: StopSignals) -> dict[str, float]:
        cfg, accum = self.cfg, self.cfg.train.accum_steps
        last: dict[str, float] = {}
        for step in range(self.step, self.stop_step):
            values = self.schedules.at(step)
            set_schedule(self.optimizer, values.lr, values.weight_decay)
            batches = list(islice(stream, accum))
            self.skipped_files += sum(b.skipped for b in batches)
            self.cpu_decoded += sum(b.cpu_decoded for b in batches)
            metrics = dist.all_reduce_mean_dict(train_step(self.ctx, batches, values, step))
            self.step = step + 1
            row = monitor.update(
                self.step,
                metrics,
                {
                    "lr": values.lr,
                    "weight_decay": values.weight_decay,
                    "momentum": values.momentum,
                    "teacher_temp": values.teacher_temp,
                },
            )
            last = row or last
            saved = self.step % cfg.run.checkpoint_every == 0 or self.step == self.stop_step
            if saved:
                self.save()
            if cfg.run.knn_every and self.step % cfg.run.knn_every == 0:
                monitor.write(self.step, self.online_knn())
            # Every rank asks at every boundary (a collective); the last step needs no stop, it saves anyway.
            if self.step < self.stop_step and (name := signals.agreed()) is not None:
                if not saved:
                    self.save()
                self.stopped_by = name
                break
        return last

    def online_knn(self) -> dict[str, float]:
        from sopvit.train.online_knn import knn_of_backbone

        acc = knn_of_backbone(self.model.teacher.backbone, self.cfg, self.device)
        return {"knn_top1": acc} if math.isfinite(acc) else {}
