"""The schedule functions every training loop here uses (pre-training, linear probes, fine-tuning): pure
functions of the step, so a resumed run needs only the step to be back on its curves."""

from __future__ import annotations

import math


def cosine(
    step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup`` steps, then cosine to ``end``."""
    if warmup > 0 and step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_then_constant(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, ``end`` afterwards."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup
