"""Time one SOPObjective forward + backward at paper scale (65536/8192 banks, 2 + 10 crops, 196 patches).

    python benchmarks/sop_objective.py [--batch 64] [--locals 10] [--device cpu] [--steps 10]

Prints the median milliseconds per step; on CUDA the step runs under bf16 autocast and is timed with events.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from sopvit import SOPObjective
from sopvit.bench import time_once


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--locals", type=int, default=10)
    parser.add_argument("--patches", type=int, default=196)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    b, crops, length, dim = args.batch, 2 + args.locals, args.patches, 256
    objective = SOPObjective().to(device)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, dim, device=device), dim=-1).requires_grad_()

    student_cls, teacher_cls = unit(crops * b), unit(2 * b).detach()
    student_patch, teacher_patch = unit(2 * b, length), unit(2 * b, length).detach()
    masks = torch.rand(2 * b, length, device=device) < 0.3

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = objective(
                student_cls, teacher_cls, student_patch, teacher_patch, masks, teacher_temp=0.04
            )
        loss.backward()

    times = [time_once(device, step) for _ in range(args.warmup + args.steps)][args.warmup :]
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": b,
        "crops": crops,
        "patches": length,
        "ms_per_step_median": round(statistics.median(times), 2),
        "ms_per_step_min": round(min(times), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
