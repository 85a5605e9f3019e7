import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sopvit.cli import main
from sopvit.eval import get_evaluator, load_protocols
from sopvit.eval.copydays import (
    CopydaysConfig,
    copy_detection_map,
    gem,
    learn_whitening,
    run,
    strong_positives,
)
from sopvit.models import create_backbone

BLOCKS = ("2000", "2001", "2002", "2003", "2004", "2005")


def texture(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    # blocky noise: survives the downscale to 32 px, unlike per-pixel noise
    small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)


def make_copydays(root: Path, attack: str = "copy", n_distractors: int = 3, n_whitening: int = 0) -> Path:
    """Copydays-named originals (2BBB00.png), strong attacks (2BBBVV.png), distractors, whitening set."""
    for sub in ("original", "strong", "distractors", "whitening"):
        (root / sub).mkdir(parents=True)
    for b, block in enumerate(BLOCKS):
        img = texture(b)
        img.save(root / "original" / f"{block}00.png")
        for v in (1, 2) if b < 2 else (1,):
            if attack == "copy":
                strong = img
            else:  # a mild crop and a colour change, Copydays-like but easy
                strong = img.crop((2, 2, 38, 38)).point(lambda p: min(255, int(p * 1.1)))
            strong.save(root / "strong" / f"{block}0{v}.png")
    for i in range(n_distractors):
        texture(100 + i).save(root / "distractors" / f"d{i}.png")
    for i in range(n_whitening):
        texture(200 + i).save(root / "whitening" / f"w{i}.png")
    return root


def cfg_for(root: Path, **kw: Any) -> CopydaysConfig:
    kw.setdefault("device", "cpu")
    return CopydaysConfig(**{"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0, **kw})


# ------------------------------------------------------------------------------------------------ pieces
def test_query_to_original_by_block() -> None:
    originals = [Path(f"original/{b}00.jpg") for b in ("2000", "2001", "2002")]
    queries = [Path("strong/200101.jpg"), Path("strong/200001.jpg"), Path("strong/200102.jpg")]
    assert strong_positives(originals, queries) == [[1], [0], [1]]
    with pytest.raises(ValueError, match=r"200901\.jpg"):
        strong_positives(originals, [Path("strong/200901.jpg")])


def test_map_by_hand() -> None:
    db = torch.eye(3)
    # query 0 nearest to its original (rank 0: AP 1); query 1's original is second (rank 1)
    queries = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.6, 0.8]])
    positives = [[0], [1]]
    # Holidays trapezoid for one positive at rank 1: (0/1 + 1/2) / 2 = 0.25
    assert copy_detection_map(queries, db, positives, top_k=None) == pytest.approx(100 * (1 + 0.25) / 2)
    # beyond top_k the positive counts as not retrieved
    assert copy_detection_map(queries, db, positives, top_k=1) == pytest.approx(50.0)
    assert copy_detection_map(db, db, [[0], [1], [2]]) == pytest.approx(100.0)


def test_gem_by_hand() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # (B=1, N=2, D=2)
    out = gem(tokens, p=4.0)
    # the negative entry is clamped to 1e-6, whose 4th power vanishes
    expected = torch.tensor([[((1 + 81) / 2) ** 0.25, (16 / 2) ** 0.25]])
    assert torch.allclose(out, expected)
    assert torch.allclose(gem(tokens.abs(), p=1.0), tokens.abs().mean(1))


def test_whitening_gives_identity_covariance() -> None:
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=gen) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    feats = torch.randn(400, 6, generator=gen) @ mixing + 3.0
    for dim, expected_dim in ((None, 6), (3, 3)):
        mean, proj = learn_whitening(feats, dim, centred_covariance=True)
        white = (feats - mean) @ proj
        assert proj.shape == (6, expected_dim)
        cov = white.T @ white / white.shape[0]
        assert torch.allclose(cov, torch.eye(expected_dim), atol=1e-4)
        assert white.mean(0).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ runs
def test_identical_copies_give_full_map(tmp_path: Path) -> None:
    root = make_copydays(tmp_path / "cd", attack="copy", n_whitening=10)
    backbone = create_backbone("vit_test")
    cfg = cfg_for(root, distractors=str(root / "distractors"), whitening=str(root / "whitening"), pca_dim=8)
    out = run(backbone, cfg)
    assert out == {
        "copydays_strong_map": pytest.approx(100.0),
        "copydays_n_queries": 8.0,
        "copydays_n_db": 9.0,
    }
    load_protocols()
    assert get_evaluator("copydays").run is run


def test_attacked_copies_are_scored(tmp_path: Path) -> None:
    root = make_copydays(tmp_path / "cd", attack="crop+colour")
    cfg = cfg_for(root, distractors=str(root / "distractors"), use_cls=False)
    out = run(create_backbone("vit_test"), cfg)
    assert 0.0 <= out["copydays_strong_map"] <= 100.0
    assert out["copydays_n_db"] == 9.0


def test_missing_root_and_empty_strong(tmp_path: Path) -> None:
    backbone = create_backbone("vit_test")
    with pytest.raises(FileNotFoundError, match="nope"):
        run(backbone, cfg_for(tmp_path / "nope"))
    root = make_copydays(tmp_path / "cd")
    for f in (root / "strong").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"strong folder .*strong"):
        run(backbone, cfg_for(root))
    with pytest.raises(ValueError, match="root: is required"):
        run(backbone, CopydaysConfig())


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = make_copydays(tmp_path / "cd")
    (root / "strong" / "200001.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*200001\.png"):
        run(create_backbone("vit_test"), cfg_for(root))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backbone = create_backbone("vit_test")
    export = tmp_path / "export"
    export.mkdir()
    torch.save(backbone.model.state_dict(), export / "model.pth")
    meta = {k: getattr(backbone, k) for k in ("arch", "kind", "timm_name", "timm_kwargs")}
    (export / "timm_args.json").write_text(json.dumps(meta))
    root = make_copydays(tmp_path / "cd")
    args = ["eval", "copydays", "--checkpoint", str(export / "model.pth"), f"root={root}"]
    args += ["image_size=32", "num_workers=0", "device=cpu", f"distractors={root / 'distractors'}"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval"] == "copydays" and result["copydays_strong_map"] == pytest.approx(100.0)
    assert result["copydays_n_queries"] == 8 and result["copydays_n_db"] == 9
    assert main([*args[:4], f"root={tmp_path / 'missing'}"]) == 2
    assert "root folder not found" in capsys.readouterr().err


def test_default_whitening_is_dinos_uncentred_second_moment() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(300, 5, generator=gen) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1]) + 2.0
    mean, proj = learn_whitening(feats)
    x = feats.double()
    eigval, eigvec = torch.linalg.eigh(x.T @ x / x.shape[0])  # DINO: torch.mm(X.T, X) / n, no centring
    order = torch.argsort(eigval, descending=True)
    expected = (eigvec[:, order] / eigval[order].sqrt()).float()
    torch.testing.assert_close(mean, feats.mean(0))
    # eigenvectors are defined up to sign
    torch.testing.assert_close(proj.abs(), expected.abs(), atol=1e-5, rtol=1e-4)
    _, centred = learn_whitening(feats, centred_covariance=True)
    assert not torch.allclose(centred.abs(), proj.abs(), atol=1e-3)


def test_tied_scores_keep_the_database_order() -> None:
    """Among equal similarities the database order decides (a stable sort), even for long tied runs."""
    query = torch.tensor([[1.0, 0.0]])
    # 40 images: the even ones are copies of the query (score 1), the odd ones orthogonal (score 0)
    database = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(20, 1)
    for i in range(1, 20):
        # image 2i is the i-th of the tied best: rank i, AP = (0 + 1 / (i + 1)) / 2
        got = copy_detection_map(query, database, [[2 * i]], top_k=None)
        assert got == pytest.approx(100 / (2 * (i + 1))), i
