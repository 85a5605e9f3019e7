import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sopvit.eval.registry import get_evaluator
from sopvit.eval.retrieval import (
    RetrievalConfig,
    average_precision,
    compute_map,
    load_image,
    protocol_gnd,
    run,
    sharded_features,
    source_size,
)
from sopvit.models import create_backbone


def test_ap_by_hand() -> None:
    # 2 positives at 0-based ranks 0 and 2: trapezoids (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2.
    expected = 0.5 + (0.5 + 2 / 3) / 4
    assert average_precision([0, 2], 2) == pytest.approx(expected)
    assert average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    # A positive missing from the ranking lowers AP through n_positives.
    assert average_precision([0], 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average_precision([], 0)


def ranking(order: list[int]) -> np.ndarray:
    return np.asarray(order)[:, None]


def test_junk_removed_before_ranking() -> None:
    # db order: 3 (junk), 5, 1 (pos), 0, 2 (pos) -> after dropping junk, positives sit at 1 and 3.
    order = ranking([3, 5, 1, 0, 2])
    mean_ap, aps, _, n_empty = compute_map(order, [{"ok": [1, 2], "junk": [3]}])
    expected = ((0 + 1 / 2) + (1 / 3 + 2 / 4)) / 4
    assert aps[0] == pytest.approx(expected) and mean_ap == pytest.approx(expected)
    no_junk, _, _, _ = compute_map(order, [{"ok": [1, 2], "junk": []}])
    assert no_junk < mean_ap and n_empty == 0


def test_query_without_positives_excluded() -> None:
    order = np.stack([np.arange(4), np.arange(4)], axis=1)
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [1, 2]}]
    mean_ap, aps, mpk, n_empty = compute_map(order, gnd, ks=(1,))
    assert n_empty == 1 and np.isnan(aps[1])
    assert mean_ap == pytest.approx(1.0) and mpk[0] == pytest.approx(1.0)


def test_all_junk_but_positive() -> None:
    # Every other image is junk: the positive at raw rank 3 becomes rank 0 -> AP 1.
    mean_ap, _, _, _ = compute_map(ranking([0, 1, 2, 3]), [{"ok": [3], "junk": [0, 1, 2]}])
    assert mean_ap == pytest.approx(1.0)


def test_mp_at_k() -> None:
    # Positives at 1-based ranks 1 and 3; revisitop precision at min(k, last positive rank).
    _, _, mpk, _ = compute_map(ranking([7, 4, 8, 5, 6]), [{"ok": [7, 8]}], ks=(1, 2, 5, 10))
    assert mpk == pytest.approx([1.0, 0.5, 2 / 3, 2 / 3])


def test_protocols() -> None:
    g = [{"easy": [0], "hard": [1], "junk": [2]}]
    assert protocol_gnd(g, "medium") == [{"ok": [0, 1], "junk": [2]}]
    assert protocol_gnd(g, "hard") == [{"ok": [1], "junk": [2, 0]}]


def make_retrieval(root: Path, n_db: int = 4, n_queries: int = 2) -> None:
    """Random JPEGs of different heights under root/jpg and gnd_roxford5k.pkl; odd queries lack positives."""
    rng = np.random.default_rng(0)
    (root / "jpg").mkdir(parents=True)
    names = [f"im{i}" for i in range(n_db + 1)]
    for i, name in enumerate(names):
        arr = rng.integers(0, 255, size=(24 + 4 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "jpg" / f"{name}.jpg")
    gnd = []
    for q in range(n_queries):
        if q % 2 == 0:
            gnd.append({"easy": [q % n_db], "hard": [(q + 1) % n_db], "bbx": [2.0, 2.0, 30.0, 20.0]})
        else:
            gnd.append({"easy": [], "hard": [], "bbx": [0.0, 0.0, 16.0, 16.0]})
        gnd[-1]["junk"] = [(q + 2) % n_db]
    # Query 0 is the one image outside the database; the others reuse database images.
    queries = [names[(n_db + q) % (n_db + 1)] for q in range(n_queries)]
    with (root / "gnd_roxford5k.pkl").open("wb") as f:
        pickle.dump({"imlist": names[:n_db], "qimlist": queries, "gnd": gnd}, f)


def test_run_on_tiny_dataset(tmp_path: Path) -> None:
    make_retrieval(tmp_path)
    cfg = RetrievalConfig(root=str(tmp_path), image_size=32, scales=(1.0, 0.5), device="cpu")
    out = run(create_backbone("vit_test"), cfg)
    assert get_evaluator("retrieval").run is run
    for key in ("rox_medium_map", "rox_hard_map", "rox_medium_mp@1", "rox_hard_mp@10"):
        assert 0.0 <= out[key] <= 100.0
    assert out["rox_medium_n_empty"] == 1.0


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k"):
        run(create_backbone("vit_test"), RetrievalConfig(dataset="rparis6k", root=str(tmp_path)))


def test_same_size_images_batch_to_the_single_image_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "jpg").mkdir()
    shapes = [(24, 40), (40, 24), (24, 40), (24, 40), (40, 24)]  # two sizes, as Oxford's landscape/portrait
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "jpg" / f"{i}.jpg")
    images: list[tuple[Path, list[float] | None]] = [(tmp_path / "jpg" / f"{i}.jpg", None) for i in range(5)]
    images.append((tmp_path / "jpg" / "0.jpg", [1.4, 2.6, 30.5, 20.2]))  # a query box with float corners
    torch.manual_seed(0)
    backbone = create_backbone("vit_test")
    cfg = RetrievalConfig(root=str(tmp_path), image_size=32, scales=(1.0, 0.5), device="cpu")
    cpu = torch.device("cpu")
    one = sharded_features(backbone, images, replace(cfg, batch_size=1), cpu)
    batched = sharded_features(backbone, images, replace(cfg, batch_size=4), cpu)
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=1e-5)
    for path, bbx in images:
        assert source_size(path, bbx) == load_image(path, bbx).size
