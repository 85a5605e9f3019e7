"""Two gloo ranks sharding retrieval / Copydays images and DAVIS videos report what one process does."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sopvit.eval.copydays import extract_features, list_images
from sopvit.eval.copydays import run as copydays_run
from sopvit.eval.davis import DavisConfig
from sopvit.eval.davis import run as davis_run
from sopvit.eval.retrieval import RetrievalConfig, load_gnd, sharded_features
from sopvit.eval.retrieval import run as retrieval_run
from sopvit.models import Backbone, create_backbone
from tests.eval.test_copydays import cfg_for, make_copydays
from tests.eval.test_davis import make_davis
from tests.eval.test_retrieval import make_retrieval
from tests.gloo import run_gloo_ranks

# (database images, queries): even shards, then 3 images on 2 ranks with one query (rank 1 holds none).
RETRIEVAL_CASES = {"even": (4, 2), "odd": (3, 1)}
VIDEOS = ("a", "b", "c")  # rank 0 tracks a and c, rank 1 tracks b


def _backbone() -> Backbone:
    torch.manual_seed(0)
    return create_backbone("vit_test")


def _retrieval_cfg(root: Path) -> RetrievalConfig:
    return RetrievalConfig(root=str(root), image_size=32, scales=(1.0, 0.5), device="cpu")


def _davis_cfg(root: Path, out: Path) -> DavisConfig:
    return DavisConfig(root=str(root), output_dir=str(out), device="cpu")


def _retrieval(data: Path) -> dict[str, tuple[dict[str, float], torch.Tensor, torch.Tensor]]:
    """Per case: the protocol's dict, and the gathered database and query features (to check their order)."""
    out = {}
    for case in RETRIEVAL_CASES:
        cfg = _retrieval_cfg(data / case)
        meta, jpg = load_gnd(data / case, cfg.dataset), data / case / "jpg"
        db = [(jpg / f"{n}.jpg", None) for n in meta["imlist"]]
        queries = [(jpg / f"{n}.jpg", g["bbx"]) for n, g in zip(meta["qimlist"], meta["gnd"], strict=True)]
        cpu = torch.device("cpu")
        out[case] = (
            retrieval_run(_backbone(), cfg),
            sharded_features(_backbone(), db, cfg, cpu),
            sharded_features(_backbone(), queries, cfg, cpu),
        )
    return out


def _davis(data: Path, out: str = "out2") -> dict[str, float]:
    return davis_run(_backbone(), _davis_cfg(data / "davis", data / out))


def _worker(rank: int, task: Callable[[Path], object], data: Path) -> None:
    # single-threaded, as the reference below: identical kernels, identical bits
    torch.save(task(data), data / f"rank{rank}.pt")


def _two_ranks(task: Callable[[Path], object], data: Path) -> list[object]:
    run_gloo_ranks(_worker, 2, task, data)
    return [torch.load(data / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single_thread(task: Callable[[], object]) -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return task()
    finally:
        torch.set_num_threads(threads)


def _assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5, nan_ok=True), key


@pytest.mark.slow
def test_retrieval_two_ranks_equal_one_process(tmp_path: Path) -> None:
    for case, (n_db, n_q) in RETRIEVAL_CASES.items():
        make_retrieval(tmp_path / case, n_db=n_db, n_queries=n_q)
    expected = _single_thread(lambda: _retrieval(tmp_path))
    assert isinstance(expected, dict)
    for result in _two_ranks(_retrieval, tmp_path):
        assert isinstance(result, dict)
        for case in RETRIEVAL_CASES:
            got, want = result[case], expected[case]
            _assert_same(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)  # rows in database order
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_davis_two_ranks_equal_one_process(tmp_path: Path) -> None:
    make_davis(tmp_path / "davis", n_frames=4, videos=VIDEOS)
    expected = _single_thread(lambda: _davis(tmp_path, "out1"))
    assert isinstance(expected, dict)
    for result in _two_ranks(_davis, tmp_path):
        assert isinstance(result, dict)
        _assert_same(result, expected)
    # Each rank wrote its own videos' predictions; together they are the single process's.
    for video in VIDEOS:
        one = sorted((tmp_path / "out1" / video).glob("*.png"))
        two = sorted((tmp_path / "out2" / video).glob("*.png"))
        assert [p.name for p in one] == [p.name for p in two] and len(one) == 4, video
        for a, b in zip(one, two, strict=True):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), b


def _copydays(data: Path) -> tuple[dict[str, float], torch.Tensor]:
    root = data / "copydays"
    cfg = cfg_for(root, batch_size=2, distractors=str(root / "distractors"))
    # 6 originals + 3 distractors on 2 ranks: shards of 5 and 4, so the order restoration is exercised
    paths = list_images(root / "original", "original") + list_images(root / "distractors", "distractors")
    return copydays_run(_backbone(), cfg), extract_features(_backbone(), paths, cfg)


@pytest.mark.slow
def test_copydays_two_ranks_equal_one_process(tmp_path: Path) -> None:
    make_copydays(tmp_path / "copydays", attack="crop")
    expected = _single_thread(lambda: _copydays(tmp_path))
    assert isinstance(expected, tuple)
    for result in _two_ranks(_copydays, tmp_path):
        assert isinstance(result, tuple)
        _assert_same(result[0], expected[0])
        torch.testing.assert_close(result[1], expected[1], rtol=1e-5, atol=1e-6)  # rows in path order
