"""Every field of the retrieval, DAVIS and Copydays configs in a test where a wrong value changes a number.

Same tables as test_protocol_options. The references here recompute each protocol from its
specification: multi-scale [CLS] retrieval with revisitop's AP and mP@k, label propagation one target
patch at a time, [CLS] + GeM copy-detection features with one-positive AP at a cut-off.
"""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sopvit.eval import copydays, davis, retrieval
from sopvit.models import Backbone
from tests.eval.test_copydays import make_copydays
from tests.eval.test_davis import make_davis
from tests.eval.test_protocol_options import (
    Obs,
    Row,
    Scenario,
    backbone_for,
    close,
    differs,
    every,
    raises,
    same,
    same_on_cpu,
    spy,
)
from tests.eval.test_retrieval import make_retrieval

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@torch.inference_mode()
def forward(backbone: Backbone, img: Image.Image) -> dict[str, Tensor]:
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return backbone(((x - MEAN[:, None, None]) / STD[:, None, None])[None].float())


# --------------------------------------------------------------------------------------- retrieval
def ref_retrieval_features(
    backbone: Backbone, paths: list[tuple[Path, Any]], size: int, scales: Any
) -> Tensor:
    """Mean [CLS] over the scales of each (boxed) image, longer side size * scale in whole patches."""
    rows = []
    for path, bbx in paths:
        img = Image.open(path).convert("RGB")
        img = img.crop(tuple(bbx)) if bbx is not None else img
        total = torch.zeros(backbone.embed_dim)
        for scale in scales:
            ratio = size * scale / max(img.size)
            w, h = (max(4, round(side * ratio / 4) * 4) for side in img.size)
            total += forward(backbone, img.resize((w, h), Image.Resampling.BICUBIC))["cls"][0]
        rows.append(F.normalize(total / len(scales), dim=0))
    return torch.stack(rows)


def ref_map(scores: Tensor, gnd: list[dict[str, Any]], ks: Any, hard: bool) -> tuple[float, list[float]]:
    """revisitop: junk dropped from the ranking; AP the trapezoid under precision-recall; mP@k the
    precision at min(k, rank of the last positive); queries without positives left out."""
    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok = set(g["hard"]) if hard else set(g["easy"]) | set(g["hard"])
        junk = set(g["junk"]) | (set(g["easy"]) if hard else set())
        if not ok:
            continue
        order = sorted(range(scores.shape[0]), key=lambda i: -float(scores[i, q]))
        ranked = [i for i in order if i not in junk]
        hits = [r for r, i in enumerate(ranked) if i in ok]
        aps.append(sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(hits)) / len(ok))
        last = hits[-1] + 1 if hits else 0
        prs.append(
            [sum(r + 1 <= min(last, k) for r in hits) / min(last, k) if min(last, k) else 0.0 for k in ks]
        )
    return 100 * sum(aps) / len(aps), [100 * sum(p[j] for p in prs) / len(prs) for j in range(len(ks))]


def retrieval_exact(sc: Scenario, row: Row) -> None:
    cfg = sc.cfg(**row.overrides)
    meta = pickle.loads((Path(cfg.root) / f"gnd_{cfg.dataset}.pkl").read_bytes())
    jpg = Path(cfg.root) / "jpg"
    db = ref_retrieval_features(
        sc.backbone, [(jpg / f"{n}.jpg", None) for n in meta["imlist"]], cfg.image_size, cfg.scales
    )
    boxed = [(jpg / f"{n}.jpg", g["bbx"]) for n, g in zip(meta["qimlist"], meta["gnd"])]
    q = ref_retrieval_features(sc.backbone, boxed, cfg.image_size, cfg.scales)
    obs = sc.alt(row)
    assert close(obs["db"], db, atol=1e-4) and close(obs["q"], q, atol=1e-4)
    prefix = {"roxford5k": "rox", "rparis6k": "rpar"}[cfg.dataset]
    expected: dict[str, float] = {}
    for protocol in ("medium", "hard"):
        gnd = meta["gnd"]
        m, mpk = ref_map(db @ q.T, gnd, cfg.ks, protocol == "hard")
        expected[f"{prefix}_{protocol}_map"] = m
        expected.update({f"{prefix}_{protocol}_mp@{k}": p for k, p in zip(cfg.ks, mpk)})
        empty = [g for g in gnd if not (g["hard"] if protocol == "hard" else g["easy"] + g["hard"])]
        expected[f"{prefix}_{protocol}_n_empty"] = float(len(empty))
    assert obs["out"] == pytest.approx(expected, abs=1e-9)


def paris_is_oxford_renamed(sc: Scenario, row: Row) -> None:
    """The same ground truth under the Paris name: the same numbers, under the Paris keys."""
    alt, ref = sc.alt(row)["out"], sc.ref(row)["out"]
    assert alt == {k.replace("rox_", "rpar_"): v for k, v in ref.items()}


RETRIEVAL_ROWS = [
    Row("dataset", "rparis6k", every(retrieval_exact, paris_is_oxford_renamed)),
    Row("root", "{tmp}/nowhere", raises(FileNotFoundError, "nowhere")),
    Row("image_size", 48, every(retrieval_exact, differs("db"))),
    Row("scales", (1.0,), every(retrieval_exact, differs("db"))),
    Row("ks", (1, 2, 3), retrieval_exact),
    Row("batch_size", 1, same(atol=1e-5)),
    Row("device", "auto", same_on_cpu),
]


@pytest.fixture(scope="module")
def retrieval_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("retrieval")
    make_retrieval(tmp / "data", n_db=6, n_queries=4)
    shutil.copy(tmp / "data" / "gnd_roxford5k.pkl", tmp / "data" / "gnd_rparis6k.pkl")
    backbone = backbone_for(3)

    def observe(cfg: retrieval.RetrievalConfig) -> Obs:
        calls: list[tuple[tuple[Any, ...], Any]] = []
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, retrieval, "sharded_features", calls)
            out = retrieval.run(backbone, cfg)
        return {"out": out, "db": calls[0][1], "q": calls[1][1]}

    base = retrieval.RetrievalConfig(root=str(tmp / "data"), image_size=32, scales=(1.0, 0.5), device="cpu")
    return Scenario(base, observe, backbone, tmp)


@pytest.mark.parametrize("row", RETRIEVAL_ROWS, ids=str)
def test_retrieval_option(retrieval_scenario: Scenario, row: Row) -> None:
    row.check(retrieval_scenario, row)


# ------------------------------------------------------------------------------------------- DAVIS
def ref_propagate(
    tar: Tensor, src: list[Tensor], seg: list[Tensor], topk: int, t: float, radius: int
) -> Tensor:
    """Each target patch: the topk (ties kept) most similar source patches within ``radius`` patches
    (0: anywhere), weighted by exp(cos / t), average their soft labels."""
    side = math.isqrt(tar.shape[0])  # the toy frames are square
    ys, xs = torch.arange(tar.shape[0]) // side, torch.arange(tar.shape[0]) % side
    # the similarities as the protocol computes them, bit for bit: the toy's flat background makes
    # near-ties at the k-th place, where a last-bit difference would change which sources are kept
    sims = torch.einsum("td,nsd->nts", tar, torch.stack(src)).permute(1, 0, 2).flatten(1)
    labels = torch.cat(seg, dim=1)
    out = torch.zeros(labels.shape[0], tar.shape[0])
    for i in range(tar.shape[0]):
        w = torch.exp(sims[i] / t)
        if radius:
            near = ((ys - ys[i]).abs() <= radius) & ((xs - xs[i]).abs() <= radius)
            w = w * near.repeat(len(src))
        kth = w.sort(descending=True).values[min(topk, len(w)) - 1]
        w = torch.where(w >= kth, w, torch.zeros_like(w))
        out[:, i] = labels @ w / w.sum()
    return out


def davis_exact(sc: Scenario, row: Row) -> None:
    """Every propagation step matches the reference, from the first frame and the n_last_frames before."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    calls = obs["_calls"]
    assert calls
    for n, ((tar, src, seg, *_), soft) in enumerate(calls):
        t = n % (obs["_frames"] - 1)  # frame t + 1 of its video
        assert len(src) == 1 + min(t, cfg.n_last_frames)
        if t > 0:
            assert torch.equal(src[0], calls[n - t][0][1][0])  # the annotated first frame, always
            if cfg.n_last_frames:  # then the frame just before, with its predicted labels
                assert torch.equal(src[-1], calls[n - 1][0][0]) and torch.equal(seg[-1], calls[n - 1][1])
        expected = ref_propagate(tar, src, seg, cfg.topk, cfg.temperature, cfg.size_mask_neighborhood)
        assert torch.allclose(soft, expected, atol=1e-5)


def patches(n: int) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert {call[0][0].shape[0] for call in sc.alt(row)["_calls"]} == {n}

    return check


def written(videos: tuple[str, ...]) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        frames = [f"{v}/{t:05d}.png" for v in videos for t in range(5)]
        assert sc.alt(row)["written"] == frames

    return check


DAVIS_ROWS = [
    Row("n_last_frames", 0, every(davis_exact, differs("soft"))),
    Row("n_last_frames", 1, every(davis_exact, differs("soft"))),
    Row("size_mask_neighborhood", 1, every(davis_exact, differs("soft"))),
    Row("size_mask_neighborhood", 0, same()),  # 12 patches already span the 8 x 8 grid
    Row("topk", 1, every(davis_exact, differs("soft"))),
    Row("temperature", 1.0, every(davis_exact, differs("soft"))),
    Row("image_size", 16, every(davis_exact, patches(16), differs())),  # 32 px -> 16 px: 4 x 4 patches
    Row("split", "train", every(written(("two",)), differs())),
    Row("output_dir", "{tmp}/elsewhere", every(same(), written(("toy", "two")))),
    Row("root", "{tmp}/nowhere", raises(FileNotFoundError, "nowhere")),
    Row("batch_size", 2, same()),
    Row("device", "auto", same_on_cpu),
]


@pytest.fixture(scope="module")
def davis_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("davis")
    make_davis(tmp / "davis", n_frames=5, videos=("toy", "two"))
    (tmp / "davis" / "ImageSets" / "2017" / "train.txt").write_text("two\n")
    backbone = backbone_for(3)

    def observe(cfg: davis.DavisConfig) -> Obs:
        calls: list[tuple[tuple[Any, ...], Any]] = []
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, davis, "propagate", calls)
            out = davis.run(backbone, cfg)
        files = sorted(p.relative_to(cfg.output_dir).as_posix() for p in Path(cfg.output_dir).glob("*/*.png"))
        shutil.rmtree(cfg.output_dir)  # the next run must write its own
        return {"out": out, "soft": [s for _, s in calls], "written": files, "_calls": calls, "_frames": 5}

    base = davis.DavisConfig(root=str(tmp / "davis"), output_dir=str(tmp / "out"), device="cpu")
    return Scenario(base, observe, backbone, tmp)


@pytest.mark.parametrize("row", DAVIS_ROWS, ids=str)
def test_davis_option(davis_scenario: Scenario, row: Row) -> None:
    row.check(davis_scenario, row)


# ---------------------------------------------------------------------------------------- Copydays
def ref_copy_features(backbone: Backbone, paths: list[Path], size: int, p: float, use_cls: bool) -> Tensor:
    rows = []
    for path in paths:
        out = forward(
            backbone, Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        )
        pooled = out["patch"][0].clamp_min(1e-6).pow(p).mean(0).pow(1 / p)
        rows.append(torch.cat([out["cls"][0], pooled]) if use_cls else pooled)
    return torch.stack(rows)


def copydays_exact(sc: Scenario, row: Row) -> None:
    """Features and mAP from the reference: one original per query, whose AP at 0-based rank r is
    1 at r = 0, else (0 + 1 / (r + 1)) / 2, and 0 beyond top_k."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    root = Path(cfg.root)

    def listing(folder: str, n: int | None = None) -> list[Path]:
        return sorted((root / folder).iterdir())[:n]

    originals, queries = listing("original"), listing("strong")
    db_paths = originals + (listing(Path(cfg.distractors).name, cfg.limit) if cfg.distractors else [])
    q = ref_copy_features(sc.backbone, queries, cfg.image_size, cfg.gem_p, cfg.use_cls)
    db = ref_copy_features(sc.backbone, db_paths, cfg.image_size, cfg.gem_p, cfg.use_cls)
    if cfg.whitening:
        white = ref_copy_features(
            sc.backbone, listing("whitening", cfg.limit), cfg.image_size, cfg.gem_p, cfg.use_cls
        )
        # pinned by test_copydays
        mean, proj = copydays.learn_whitening(white, cfg.pca_dim, cfg.whitening_centred)
        q, db = (q - mean) @ proj, (db - mean) @ proj
    assert close(obs["q"], q, atol=1e-4) and close(obs["db"], db, atol=1e-4)
    scores = F.normalize(q, dim=1) @ F.normalize(db, dim=1).T
    aps = []
    for i, query in enumerate(queries):
        own = next(j for j, o in enumerate(originals) if o.name[:4] == query.name[:4])
        r = int((scores[i] > scores[i, own]).sum())
        aps.append(0.0 if cfg.top_k is not None and r >= cfg.top_k else 1.0 if r == 0 else 0.5 / (r + 1))
    expected = {"copydays_strong_map": 100 * sum(aps) / len(aps), "copydays_n_queries": float(len(queries))}
    assert obs["out"] == pytest.approx({**expected, "copydays_n_db": float(len(db_paths))}, abs=1e-9)


def db_size(n: int) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["out"]["copydays_n_db"] == n

    return check


def width(n: int) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["q"].shape[1] == n

    return check


def map_moves(up: bool) -> Any:
    """Fewer database images can only lift an original in the ranking, a shorter cut-off only lose it."""

    def check(sc: Scenario, row: Row) -> None:
        alt, ref = sc.alt(row)["out"]["copydays_strong_map"], sc.ref(row)["out"]["copydays_strong_map"]
        assert (alt >= ref) if up else (alt <= ref)

    return check


WHITEN = (("whitening", "{tmp}/cd/whitening"),)

COPYDAYS_ROWS = [
    Row("root", "{tmp}/nowhere", raises(FileNotFoundError, "nowhere")),
    Row("image_size", 16, every(copydays_exact, differs("q"))),
    Row("gem_p", 1.0, every(copydays_exact, differs("q"))),
    Row("use_cls", False, every(copydays_exact, width(32))),
    Row("distractors", None, every(copydays_exact, db_size(6), map_moves(up=True))),
    Row("whitening", "{tmp}/cd/whitening", every(copydays_exact, differs("q"))),
    Row("pca_dim", 4, every(copydays_exact, width(4)), WHITEN),
    Row("pca_dim", 4, same(atol=0.0)),  # without whitening there is nothing to reduce
    Row("whitening_centred", True, every(copydays_exact, differs("q")), WHITEN),
    Row("whitening_centred", True, same(atol=0.0)),  # without whitening there is nothing to centre
    Row("limit", 1, every(copydays_exact, db_size(7), map_moves(up=True))),
    Row("limit", 3, every(copydays_exact, differs("q")), WHITEN),  # the first 3 whitening images
    Row("top_k", 1, every(copydays_exact, map_moves(up=False))),
    Row("top_k", None, copydays_exact),
    Row("batch_size", 3, same()),
    Row("num_workers", 2, same(atol=0.0)),
    Row("device", "auto", same_on_cpu),
]


@pytest.fixture(scope="module")
def copydays_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("copydays")
    root = make_copydays(tmp / "cd", attack="crop+colour", n_distractors=3, n_whitening=10)
    backbone = backbone_for(3)

    def observe(cfg: copydays.CopydaysConfig) -> Obs:
        calls: list[tuple[tuple[Any, ...], Any]] = []
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, copydays, "copy_detection_map", calls)
            out = copydays.run(backbone, cfg)
        (q, db, *_), _ = calls[0]
        return {"out": out, "q": q, "db": db}

    base = copydays.CopydaysConfig(
        root=str(root),
        image_size=32,
        batch_size=4,
        num_workers=0,
        distractors=str(root / "distractors"),
        device="cpu",
    )
    return Scenario(base, observe, backbone, tmp)


@pytest.mark.parametrize("row", COPYDAYS_ROWS, ids=str)
def test_copydays_option(copydays_scenario: Scenario, row: Row) -> None:
    row.check(copydays_scenario, row)


TABLES = {
    "retrieval": (retrieval.RetrievalConfig, RETRIEVAL_ROWS),
    "davis": (davis.DavisConfig, DAVIS_ROWS),
    "copydays": (copydays.CopydaysConfig, COPYDAYS_ROWS),
}
