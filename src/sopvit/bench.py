"""``sopvit bench``: throughput of the training step of the configured method (SOP, iBOT or DINO), of the
same step with a trivial loss, and of the inputs.

Both steps run the same code (:func:`sopvit.train.step.train_step`) on the same synthetic batches; the
baseline swaps the method's objective for a trivial loss on the same head outputs, so the ratio of the two
is the cost of the method itself. FLOPs are counted with ``torch.utils.flop_counter`` on the baseline step
(the model's FLOPs); MFU divides them by the measured time and the device's bf16 peak.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sopvit.data.pipeline import Batch, PretrainInputs
from sopvit.device import autocast_dtype, resolve_device, synchronize
from sopvit.methods import get_method, method_names
from sopvit.methods.interface import ScheduleValues, StudentOutputs, TeacherOutputs, TokenPlan
from sopvit.optim.groups import build_optimizer, set_schedule
from sopvit.recipe.build import build_model, build_objective
from sopvit.recipe.config import PretrainConfig
from sopvit.train.parallel import prepare
from sopvit.train.step import StepContext, train_step

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; pass --peak-tflops for anything else.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


class TrivialObjective(nn.Module):
    """Stands in for the method's objective: a loss that touches every head output and nothing else."""

    def __init__(self, like: Any) -> None:
        super().__init__()
        self.masks_student = like.masks_student
        self.like = like  # the same tokens go through the head as with the method

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        return TokenPlan(self.like.plan_tokens(masks).teacher)

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = student.cls.float().pow(2).mean()
        if student.tokens.numel():  # DINO sends no patch tokens through the head: their mean would be NaN
            loss = loss + student.tokens.float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    def after_update(self, teachers: Sequence[TeacherOutputs]) -> None:
        return None


def time_once(device: torch.device, fn: Callable[[], object]) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def synthetic_batch(cfg: PretrainConfig, grid: tuple[int, int], device: torch.device) -> Batch:
    d, b = cfg.data, cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    sizes = [d.global_size] * 2 + [d.local_size] * d.n_locals
    crops = [torch.randn(b, d.in_chans, s, s, generator=g).to(device) for s in sizes]
    masks = (torch.rand(2 * b, *grid, generator=g) < d.mask_ratio[1]).to(device)
    return Batch(crops=crops, masks=masks, ids=torch.arange(b), skipped=0)


def build_step(cfg: PretrainConfig, method: bool) -> tuple[StepContext, Batch]:
    """A training step context with the configured method's objective (``method``) or the trivial loss,
    and a batch."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if device.type == "cpu":
        for encoder in (model.student, model.teacher):
            encoder.backbone.set_fused_attention(False)
    dtype = autocast_dtype(cfg.train.precision, device)
    parallel = prepare(model, cfg.train, device, 1, dtype is not None)
    objective: Any = build_objective(cfg, device)
    if not method:
        objective = TrivialObjective(objective)
    optimizer = build_optimizer(model.student, device)
    set_schedule(optimizer, 1e-4, 0.04)
    ctx = StepContext(
        model,
        parallel,
        objective,
        optimizer,
        device,
        dtype,
        cfg.train.clip_grad,
        "stop",
    )
    return ctx, synthetic_batch(cfg, model.student.backbone.grid_size(cfg.data.global_size), device)


def run_one_step(cfg: PretrainConfig) -> torch.device:
    """One training step of the configured method, for ``bench --memory --measure``'s peak memory."""
    ctx, batch = build_step(cfg, method=True)
    train_step(ctx, [batch], VALUES, 0)
    synchronize(ctx.device)
    return ctx.device


def time_objective(ctx: StepContext, batch: Batch, warmup: int, steps: int) -> float:
    """Median ms of the method's objective alone (loss, backward, its own update: prototypes and memories
    for SOP, centers for iBOT/DINO) on random head outputs shaped like the step's: the method's share."""
    b, crops, device = batch.crops[0].shape[0], len(batch.crops), ctx.device
    masks = batch.masks.flatten(1).to(device)
    if not ctx.objective.masks_student:
        masks = torch.zeros_like(masks)
    dim = ctx.model.student.head.out_dim

    def head_out(n: int, grad: bool = False) -> torch.Tensor:
        return nn.functional.normalize(torch.randn(n, dim, device=device), dim=-1).requires_grad_(grad)

    def run() -> None:
        plan = ctx.objective.plan_tokens(masks)
        teacher = TeacherOutputs(head_out(2 * b), head_out(int(plan.teacher.sum())), masks, plan, batch.ids)
        student = StudentOutputs(head_out(crops * b, True), head_out(int(masks.sum()), True))
        with ctx.autocast():
            loss, _ = ctx.objective.compute_loss(student, teacher, VALUES)
        loss.backward()
        ctx.objective.after_update([teacher])

    times = [time_once(device, run) for _ in range(warmup + steps)]
    return statistics.median(times[warmup:])


VALUES = ScheduleValues(
    step=0, lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04, patch_teacher_temp=0.04
)


def time_steps(cfg: PretrainConfig, warmup: int, steps: int) -> dict[str, float]:
    """Median ms/step of the SOP step and of the trivial-loss step, timed alternately so that drifts
    of a shared machine's speed hit both alike; model FLOPs counted on the trivial step."""
    device = resolve_device(cfg.train.device)
    values = VALUES
    (method_ctx, batch), (base_ctx, _) = build_step(cfg, method=True), build_step(cfg, method=False)
    times: dict[str, list[float]] = {"method": [], "base": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pair = [("method", method_ctx), ("base", base_ctx)]
    for i in range(warmup + steps):
        # ABBA order: whichever step runs second in a pair finds the caches warm for a different model.
        for name, ctx in pair if i % 2 == 0 else pair[::-1]:
            elapsed = time_once(device, lambda c=ctx: train_step(c, [batch], values, 0))  # type: ignore[misc]
            if i >= warmup:
                times[name].append(elapsed)
    with FlopCounterMode(display=False) as counter:
        train_step(base_ctx, [batch], values, 0)
    out = {f"{k}_ms_per_step": statistics.median(v) for k, v in times.items()}
    out["objective_ms"] = time_objective(method_ctx, batch, warmup, steps)
    out["flops_per_step"] = float(counter.get_total_flops())
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375)) -> Path:
    """ImageNet-sized JPEGs (smooth random colour fields, so they compress like photos) for decode timing."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        small = (torch.rand(3, size[1] // 25, size[0] // 25, generator=g) * 255).byte()
        big = nn.functional.interpolate(small[None].float(), size=(size[1], size[0]), mode="bilinear")[0]
        Image.fromarray(big.byte().permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its exited, reaped children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_inputs(cfg: PretrainConfig, batches: int, scratch: Path) -> dict[str, Any]:
    """The input pipeline alone (read, decode, multi-crop, masks) on the step's device, as configured.

    ``input_images_per_s``: over ``batches`` batches after 2 warm-up ones (worker start-up is not
    throughput). ``input_cpu_ms_per_image``: CPU time of the whole pass (workers included, start-up too,
    so slightly pessimistic) per image: what the host spends per image, whatever the device.
    """
    device = resolve_device(cfg.train.device)
    data = cfg.data
    if data.dataset in ("folder", "imagenet") and data.path == str(scratch / "jpegs"):
        synthetic_jpegs(scratch / "jpegs", cfg.train.batch_size * (batches + 2))
        data = replace(data, dataset="folder")
    patch = build_model(cfg).student.backbone.patch_size
    inputs = PretrainInputs(data, patch, cfg.train.batch_size, 1, 0, cfg.train.seed)
    cpu_start = _cpu_seconds()
    stream = inputs.batches(0, batches + 2, device)
    list(islice(stream, 2))
    synchronize(device)
    start = time.perf_counter()
    n = sum(b.crops[0].shape[0] for b in stream)
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start  # the stream is exhausted: its workers have exited
    return {
        "input_path": data.augment_on,
        "input_images_per_s": n / seconds,
        "input_cpu_ms_per_image": 1000 * cpu / ((batches + 2) * cfg.train.batch_size),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_benchmark(
    cfg: PretrainConfig, warmup: int, steps: int, input_batches: int, peak_tflops: float | None, scratch: Path
) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    b = cfg.train.batch_size
    t = time_steps(cfg, warmup, steps)
    name = device_name(device)
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "method": cfg.method,
        "arch": cfg.model.arch,
        "batch": b,
        "crops": f"2x{cfg.data.global_size} + {cfg.data.n_locals}x{cfg.data.local_size}",
        "precision": str(autocast_dtype(cfg.train.precision, device) or torch.float32).replace("torch.", ""),
        "compile": cfg.train.compile,
        "method_ms_per_step": t["method_ms_per_step"],
        "method_images_per_s": 1000 * b / t["method_ms_per_step"],
        "base_ms_per_step": t["base_ms_per_step"],
        "base_images_per_s": 1000 * b / t["base_ms_per_step"],
        "method_overhead": t["method_ms_per_step"] / t["base_ms_per_step"] - 1,
        "objective_ms": t["objective_ms"],
        "objective_share": t["objective_ms"] / t["method_ms_per_step"],
        "model_gflops_per_step": t["flops_per_step"] / 1e9,
        "mfu": None,
        "peak_memory_gib": t.get("peak_memory_gib"),
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if peak_tflops:
        result["mfu"] = t["flops_per_step"] / (t["method_ms_per_step"] / 1000) / (peak_tflops * 1e12)
    if input_batches > 0:
        result |= time_inputs(cfg, input_batches, scratch)
    return result


def format_table(r: dict[str, Any]) -> str:
    name = r.get("method", "sop")
    m = get_method(name).display_name if name in method_names() else name
    rows = [
        ("device", r["device"]),
        ("torch", r["torch"]),
        ("method, arch", f"{r['method']}, {r['arch']}"),
        ("batch / crops", f"{r['batch']} / {r['crops']}"),
        ("precision, compile", f"{r['precision']}, {r['compile']}"),
        (f"step with {m}", f"{r['method_ms_per_step']:.1f} ms  {r['method_images_per_s']:.0f} img/s"),
        ("step, trivial loss", f"{r['base_ms_per_step']:.1f} ms  {r['base_images_per_s']:.0f} img/s"),
        (f"{m} overhead (A/B)", f"{100 * r['method_overhead']:+.1f}% of the trivial-loss step"),
        (
            f"{m} objective alone",
            f"{r['objective_ms']:.1f} ms = {100 * r['objective_share']:.1f}% of the {m} step",
        ),
        ("model GFLOPs/step", f"{r['model_gflops_per_step']:.1f}"),
        (f"MFU ({m} step)", "n/a (no known peak)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
        ("peak memory", "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"),
        ("host peak RSS", f"{r['host_peak_rss_gib']:.2f} GiB"),
    ]
    if "input_images_per_s" in r:
        bound = "  input-bound" if r["input_images_per_s"] < r["method_images_per_s"] else ""
        rows.append(
            (
                f"input (augment_on={r.get('input_path', 'workers')})",
                f"{r['input_images_per_s']:.0f} img/s, "
                f"{r.get('input_cpu_ms_per_image', float('nan')):.2f} CPU core-ms/img{bound}",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def save_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
