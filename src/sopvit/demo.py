"""``sopvit demo``: pre-train on Fashion-MNIST on the CPU and show k-NN before and after."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from sopvit.config import load_config
from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.eval.knn import knn_accuracy
from sopvit.recipe.config import pretrain_config_type
from sopvit.train.online_knn import knn_of_backbone

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "fashion_mnist_cpu.yaml"


def raw_pixel_knn() -> float:
    """The reference point: 20-NN on standardised raw pixels (85.7 on Fashion-MNIST)."""
    (train_x, train_y), (test_x, test_y) = (load_fashion_mnist(s) for s in ("train", "test"))

    def feats(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1).float() - train_x.float().mean(), dim=1)

    return knn_accuracy(feats(train_x), train_y, feats(test_x), test_y, ks=(20,))[20]


def plot(run_dir: Path, results: dict[str, float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "loss_cls", "loss_patch"):
        ax_loss.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("SOP pre-training loss")
    ax_loss.legend()
    names = ["raw pixels", "random init", "SOP (ours)"]
    values = [results["knn_raw_pixels"], results["knn_random_init"], results["knn_trained"]]
    bars = ax_knn.bar(names, values, color=["#999999", "#d62728", "#2ca02c"])
    ax_knn.bar_label(bars, fmt="%.1f")
    ax_knn.set_ylim(0, 100)
    ax_knn.set_title("Fashion-MNIST 20-NN top-1 (%)")
    fig.tight_layout()
    path = run_dir / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(overrides: Sequence[str] = ()) -> dict[str, float]:
    from sopvit.train.trainer import Trainer

    if not RECIPE.is_file():
        raise FileNotFoundError(f"the demo recipe {RECIPE} is missing; run the demo from a clone of sopvit")
    cfg = load_config(
        pretrain_config_type(), RECIPE, ["run.knn_dataset=fashion_mnist", "run.knn_limit=null", *overrides]
    )
    start = time.perf_counter()
    trainer = Trainer(cfg)
    baseline_path = trainer.run_dir / "demo_baseline.json"
    if trainer.step == 0 or not baseline_path.is_file():
        print("k-NN of raw pixels and of the randomly initialised teacher ...", flush=True)
        baseline = {
            "knn_raw_pixels": raw_pixel_knn(),
            "knn_random_init": knn_of_backbone(trainer.model.teacher.backbone, cfg, trainer.device),
        }
        baseline_path.write_text(json.dumps(baseline))
    baseline = json.loads(baseline_path.read_text())
    print(f"pre-training {cfg.model.arch} for {trainer.stop_step} steps on Fashion-MNIST ...", flush=True)
    trainer.fit()
    results = {
        **baseline,
        "knn_trained": knn_of_backbone(trainer.model.teacher.backbone, cfg, trainer.device),
    }
    results["minutes"] = (time.perf_counter() - start) / 60
    (trainer.run_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    figure = plot(trainer.run_dir, results)
    from sopvit.visualize import prototype_gallery, write_report

    prototype_gallery(trainer.run_dir, trainer.run_dir / "prototypes.png")
    report = write_report(trainer.run_dir)
    print("\nFashion-MNIST, weighted 20-NN (T=0.07), train 60k -> test 10k, top-1 %")
    print(f"  raw pixels             {results['knn_raw_pixels']:6.2f}")
    print(f"  random-init teacher    {results['knn_random_init']:6.2f}")
    print(f"  SOP-trained teacher    {results['knn_trained']:6.2f}")
    print(
        f"run directory: {trainer.run_dir}  (plot: {figure.name}, prototypes.png, report: {report.name}; "
        f"{results['minutes']:.1f} min in all)"
    )
    return results
