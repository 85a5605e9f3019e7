"""SOP beside iBOT and DINO on the Fashion-MNIST demo backbone: one data pipeline, one loop, one budget.

    python benchmarks/compare_methods.py [--methods sop ibot dino] [--seeds 0 1 2] [--epochs 3]
                                         [--equal-time] [--linear-epochs 100] [--out PATH]

Each method pre-trains from its demo recipe (configs/pretrain/fashion_mnist_cpu{,_ibot,_dino}.yaml: the
same backbone, crops, batch, optimizer and schedule; only ``method:`` and its section differ), for the
same number of epochs, so every run sees the same images. With ``--equal-time`` each method instead gets
the wall-clock SOP's epochs take: its epochs are scaled by SOP's step time over its own, both measured
here first with ``sopvit.bench.time_steps`` (alternating methods, so a shared machine's drift hits all
alike); the schedules span the scaled length. Measured training time is reported beside the scores.
The teacher backbone is then evaluated with the 20-NN protocol (60k -> 10k, T = 0.07) and the fast
linear probe (cached features, the default lr x optimizer x wd sweep). Results: ``<out>.json`` (every run),
``<out>.md`` (mean +- std table) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "sop": ROOT / "configs/pretrain/fashion_mnist_cpu.yaml",
    "ibot": ROOT / "configs/pretrain/fashion_mnist_cpu_ibot.yaml",
    "dino": ROOT / "configs/pretrain/fashion_mnist_cpu_dino.yaml",
}
NAMES = {"sop": "SOP", "ibot": "iBOT", "dino": "DINO"}


def step_ms(methods: list[str], steps: int = 30) -> dict[str, float]:
    """Median ms of one training step of each method's recipe, two rounds in mirrored order."""
    from sopvit.bench import time_steps
    from sopvit.config import load_config
    from sopvit.recipe.config import pretrain_config_type

    times: dict[str, list[float]] = {m: [] for m in methods}
    for order in (methods, methods[::-1]):
        for method in order:
            cfg = load_config(pretrain_config_type(), RECIPES[method], ["run.progress=false"])
            times[method].append(time_steps(cfg, warmup=5, steps=steps)["method_ms_per_step"])
    return {m: statistics.mean(v) for m, v in times.items()}


def pretrain(method: str, seed: int, epochs: float | None, run_dir: Path) -> float:
    """Pre-train one run (resumes an interrupted one); returns the seconds this call trained."""
    from sopvit.config import load_config
    from sopvit.recipe.config import pretrain_config_type
    from sopvit.train.trainer import Trainer

    overrides = [f"train.seed={seed}", f"run.output_dir={run_dir}", "run.progress=false"]
    if method == "sop":
        overrides.append(f"sop.seed={seed}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    trainer = Trainer(load_config(pretrain_config_type(), RECIPES[method], overrides))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def evaluate(run_dir: Path, linear_epochs: int) -> dict[str, float]:
    from sopvit.eval.knn import KNNConfig
    from sopvit.eval.knn import run as knn
    from sopvit.eval.linear import LinearConfig
    from sopvit.eval.linear import run as linear
    from sopvit.export.load import load_pretrained

    backbone = load_pretrained(run_dir)
    out = {"knn20": knn(backbone, KNNConfig(ks=(20,)))["knn_top1@20"]}
    out["linear"] = linear(backbone, LinearConfig(epochs=linear_epochs))["linear_top1"]
    return out


def table(runs: list[dict[str, Any]], methods: list[str]) -> str:
    lines = [
        "| method | epochs | k-NN@20 | linear | pre-training time | runs |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue

        def stat(key: str, fmt: str = ".2f", rows: list[dict[str, Any]] = mine) -> str:
            values = [r[key] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):{fmt}} +- {std:{fmt}}"

        lines.append(
            f"| {NAMES[method]} | {mine[0].get('epochs', 3):.2f} | {stat('knn20')} | {stat('linear')} "
            f"| {stat('train_min', '.1f')} min "
            f"| {len(mine)} (seeds {', '.join(str(r['seed']) for r in mine)}) |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in zip(axes, ("knn20", "linear"), ("20-NN top-1 (%)", "linear probe top-1 (%)")):
        for i, method in enumerate(methods):
            values = [r[key] for r in runs if r["method"] == method]
            if not values:
                continue
            ax.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.6)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), [NAMES[m] for m in methods])
        values = [r[key] for r in runs]
        ax.set_ylim(min(values) - 3, max(values) + 2)
        ax.set_title(f"Fashion-MNIST {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["sop", "ibot", "dino"], choices=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None, help="override the recipes' 3 epochs")
    parser.add_argument("--equal-time", action="store_true", help="scale epochs to SOP's wall-clock")
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_fashion_mnist")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    record = args.out.with_suffix(".json")
    record.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(record.read_text()) if record.exists() else {}
    done: list[dict[str, Any]] = old.get("runs", [])
    epochs = {m: args.epochs for m in args.methods}
    ms = old.get("meta", {}).get("step_ms")
    if args.equal_time:
        ms = ms or step_ms(sorted(set(args.methods) | {"sop"}))
        base = args.epochs or 3
        epochs = {m: base * ms["sop"] / ms[m] for m in args.methods}
        print(json.dumps({"step_ms": ms, "epochs": epochs}), flush=True)
    for seed in args.seeds:  # seed-major: an interrupted comparison still has every method at some seeds
        for method in args.methods:
            if any(r["method"] == method and r["seed"] == seed for r in done):
                continue
            run_dir = args.runs / f"{method}_seed{seed}"
            seconds = pretrain(method, seed, epochs[method], run_dir)
            scores = evaluate(run_dir, args.linear_epochs)
            row = {"method": method, "seed": seed, "epochs": epochs[method] or 3, "train_min": seconds / 60}
            done.append({**row, **scores})
            print(json.dumps(done[-1]), flush=True)
            meta = {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "epochs": args.epochs or 3,
                "budget": "equal wall-clock (epochs scaled by step time)"
                if args.equal_time
                else "equal images",
                "step_ms": ms,
                "linear_epochs": args.linear_epochs,
            }
            record.write_text(json.dumps({"meta": meta, "runs": done}, indent=1))
    methods = [m for m in args.methods if any(r["method"] == m for r in done)]
    text = table(done, methods)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(done, methods, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
