"""A gallery of a run's prototypes: SOP's built from the saved [CLS] memory, iBOT's and DINO's learned
ones (the head's prototype layer) shown through the training images that score highest on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sopvit.data.datasets import build_dataset
from sopvit.data.transforms import to_uint8_chw
from sopvit.methods.sop.prototypes import build_prototypes
from sopvit.visualize.attention import Run, load_run, to_numpy_image

# Figure geometry in inches (per grid cell, plus a title band) at DPI; fixed (no tight bbox) so the PNG
# size encodes the grid.
CELL_W, CELL_H, HEADER, DPI = 1.4, 1.6, 0.3, 100


@dataclass(frozen=True)
class GalleryLayout:
    """Which images a gallery shows: one row per prototype, the anchor then its k supports.

    anchor_ids:  (P,)   data-set index of each anchor.
    support_ids: (P, k) data-set index of each neighbour, most similar first.
    scores:      (P, k) contribution score of each neighbour: its dot product with the anchor.
    """

    anchor_ids: Tensor
    support_ids: Tensor
    scores: Tensor

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the drawn figure."""
        return int(self.support_ids.shape[0]), int(self.support_ids.shape[1]) + 1


def gallery_layout(
    embeddings: Tensor, sample_ids: Tensor, n_prototypes: int, k: int, seed: int = 0
) -> GalleryLayout:
    """SOP prototypes over the memory rows that come from real images (``sample_ids >= 0``).

    Rows still holding the bank's random initial noise (id -1) are dropped first: they have no
    image to show and would only attract anchors towards noise. Anchors are drawn uniformly with
    ``seed``; each gets its ``k`` nearest valid non-anchor rows, exactly as ``build_prototypes``.
    """
    if embeddings.ndim != 2 or sample_ids.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be (N, d) and sample_ids (N,), got {tuple(embeddings.shape)} and "
            f"{tuple(sample_ids.shape)}"
        )
    if n_prototypes < 2:
        raise ValueError(f"n_prototypes must be >= 2, got {n_prototypes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    valid = (sample_ids >= 0).nonzero().flatten()
    n_valid = int(valid.numel())
    if n_valid == 0:
        raise ValueError(
            "the [CLS] memory holds no rows from real images yet (all sample ids are -1, the initial "
            "noise); train longer (at least cls_bank_size / batch_size steps) before drawing prototypes"
        )
    if n_valid < n_prototypes + k:
        raise ValueError(
            f"the [CLS] memory holds {n_valid} rows from real images; {n_prototypes} prototypes with "
            f"k={k} need at least {n_prototypes + k}: lower n_prototypes or k, or train longer"
        )
    memory = embeddings[valid].float()
    generator = torch.Generator().manual_seed(seed)
    # keep_fraction 1: a gallery shows every anchor drawn; smoothing only affects the anchor's own
    # weight, which the gallery does not display.
    protos = build_prototypes(memory, n_prototypes, k, 0.0, 1.0, generator)
    rows = protos.support_index.reshape(n_prototypes, k + 1)[:, :k]  # drop the trailing anchor column
    scores = protos.weights.reshape(n_prototypes, k + 1)[:, :k]
    ids = sample_ids[valid]
    return GalleryLayout(ids[protos.anchor_index].clone(), ids[rows].clone(), scores.clone())


def run_gallery_layout(run: Run, n_prototypes: int = 8, k: int | None = None, seed: int = 0) -> GalleryLayout:
    """:func:`gallery_layout` over the [CLS] memory of a loaded run; ``k`` defaults to ``sop.cls_k``."""
    objective = run.state.get("objective", {})
    keys = ("cls_bank.embeddings", "cls_bank.sample_ids")
    if not all(key in objective for key in keys):
        raise ValueError(f"checkpoint {run.checkpoint} has no [CLS] memory ({', '.join(keys)})")
    k = getattr(run.config.method_config, "cls_k", 8) if k is None else k
    return gallery_layout(objective[keys[0]], objective[keys[1]], n_prototypes, k, seed)


def learned_gallery_layout(
    run: Run, n_prototypes: int = 8, k: int = 8, data_path: str | None = None, limit: int = 10000
) -> GalleryLayout:
    """iBOT/DINO: the ``n_prototypes`` learned prototypes the teacher uses most (arg-max over up to ``limit``
    training images), each shown as the image with the highest [CLS] logit on it, then the next ``k``
    (scores: the logits, i.e. cosine similarities when the prototypes' norm is fixed at 1)."""
    from sopvit.eval.cache import EvalDataConfig, split_features
    from sopvit.export.load import teacher_encoder

    data = run.config.data
    teacher = teacher_encoder(run.state, run.config)
    cfg = EvalDataConfig(
        dataset=data.dataset,
        path=data_path or data.path,
        image_size=data.global_size,
        in_chans=data.in_chans,
        limit=min(limit, data.limit or limit),
    )
    features, _ = split_features(teacher.backbone, cfg, "train", "cls")
    with torch.no_grad():
        logits = teacher.head(features.to(next(teacher.head.parameters()).device)).float().cpu()
    if logits.shape[0] < k + 1:
        raise ValueError(f"{logits.shape[0]} training images cannot show k={k} neighbours per prototype")
    usage = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
    chosen = usage.argsort(descending=True, stable=True)[:n_prototypes]
    scores, ids = logits[:, chosen].T.topk(k + 1, dim=1)  # (P, k + 1), best first
    return GalleryLayout(ids[:, 0].clone(), ids[:, 1:].clone(), scores[:, 1:].clone())


def _image(dataset: Any, index: int, in_chans: int, source: str) -> np.ndarray:
    if not 0 <= index < len(dataset):
        raise ValueError(
            f"the memory refers to image {index} but the data set at {source} has {len(dataset)}; "
            "is data_path the data set the run was trained on?"
        )
    return to_numpy_image(to_uint8_chw(dataset[index]["image"], in_chans))


def prototype_gallery(
    run_dir_or_checkpoint: str | Path,
    out_png: str | Path,
    data_path: str | Path | None = None,
    n_prototypes: int = 8,
    k: int | None = None,
    seed: int = 0,
) -> Path:
    """Draw ``n_prototypes`` prototypes of a run as a PNG grid and return its path.

    SOP: each row is one prototype: its anchor image, then its ``k`` (default: the run's ``sop.cls_k``)
    support images titled with their contribution score (cosine similarity to the anchor, as the
    memory rows are unit vectors). iBOT/DINO: each row is one of the most used learned prototypes, its
    top-scoring training image then the next ``k`` (default 8) with their logits
    (:func:`learned_gallery_layout`). Images come from the run's training set (``data.dataset`` at
    ``data.path``; ``data_path`` overrides the path). The figure is ``(k + 1) * CELL_W`` by
    ``n_prototypes * CELL_H + HEADER`` inches at ``DPI``.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, whatever the user's backend is
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    run = load_run(run_dir_or_checkpoint)
    data = run.config.data
    path = str(data_path) if data_path is not None else data.path
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    spec = run.config.spec
    if spec.gallery is None:
        raise ValueError(
            f"{spec.display_name} has no prototypes to draw (method={spec.name}: neither a memory of "
            "embeddings nor a learned prototype layer); its run is trained and exports as usual"
        )
    learned = spec.gallery == "head"
    if learned:
        layout = learned_gallery_layout(run, n_prototypes, 8 if k is None else k, path)
    else:
        layout = run_gallery_layout(run, n_prototypes, k, seed)
    dataset: Any = build_dataset(data.dataset, path, "train", limit=data.limit)
    source = f"{data.dataset}:{path or 'default location'}"

    rows, cols = layout.grid
    height = rows * CELL_H + HEADER
    fig, axes = plt.subplots(rows, cols, figsize=(cols * CELL_W, height), dpi=DPI, squeeze=False)
    for r in range(rows):
        first = "top" if learned else "anchor"
        cells = [(int(layout.anchor_ids[r]), f"{first} #{int(layout.anchor_ids[r])}")]
        cells += [
            (int(i), f"{float(s):.3f}") for i, s in zip(layout.support_ids[r], layout.scores[r], strict=True)
        ]
        for c, (index, title) in enumerate(cells):
            ax = axes[r, c]
            img = _image(dataset, index, data.in_chans, source)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(title, fontsize=8, color="tab:red" if c == 0 else "black")
            ax.set_xticks([])
            ax.set_yticks([])
    step = run.state.get("step", "?")
    title = (
        f"{spec.display_name} learned prototypes (most used) and their top training images, step {step}"
        if learned
        else f"{spec.display_name} prototypes from the [CLS] memory, step {step}"
    )
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / height, va="top")
    # Fixed margins (not tight_layout/bbox) keep the output size exactly the grid times the cell size;
    # the top margin leaves the title band plus room for the first row's titles.
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - (HEADER + 0.25) / height, hspace=0.35)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out_png, dpi=DPI)
    finally:
        plt.close(fig)
    return out_png
