"""What a run reports: a progress bar, TensorBoard scalars and ``metrics.jsonl`` (rank 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


class Monitor:
    """Collects per-step tensors and turns them into numbers only every ``log_every`` steps,
    so that logging does not force a device sync on every step."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        images_per_step: int,
        log_every: int,
        enabled: bool,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.log_every = log_every
        self.total_steps = total_steps
        self._pending: list[dict[str, torch.Tensor]] = []
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.writer: Any = None
        self.bar: Any = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops what the killed one logged after its checkpoint (steps > start_step),
            # and keeps the row and k-NN result of the checkpointed step itself.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(
        self, step: int, metrics: dict[str, torch.Tensor], schedule: dict[str, float]
    ) -> dict[str, float]:
        """Record step ``step`` (1-based count of finished steps); returns the logged row when it logs."""
        if not self.enabled:
            return {}
        self._pending.append(metrics)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every and step != self.total_steps:
            return {}
        now = time.perf_counter()
        rate = self.images_per_step * (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        # A skipped step reports only {"skipped": 1}: average each metric over the steps that have it.
        keys = dict.fromkeys(k for m in self._pending for k in m)
        row = {
            k: float(torch.stack([m[k] for m in self._pending if k in m]).mean())
            for k in keys
            if k != "skipped"
        }
        row["skipped_steps"] = float(sum(float(m["skipped"]) for m in self._pending if "skipped" in m))
        self._pending.clear()
        row |= schedule
        row["images_per_s"] = rate
        self.write(step, row)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row['lr']:.2e}", img_s=f"{rate:.0f}"
            )
        return row

    def write(self, step: int, row: dict[str, float]) -> None:
        """Append ``row`` to metrics.jsonl and TensorBoard (also used for k-NN results)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(key, value, step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
