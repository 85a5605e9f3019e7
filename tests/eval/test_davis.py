import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sopvit.eval.davis import DavisConfig, neighborhood_mask, propagate, run
from sopvit.eval.registry import get_evaluator
from sopvit.models import create_backbone


def one_hot_features(obj: np.ndarray) -> torch.Tensor:
    """(L, 4) unit features: object identity dominates, a weak position code breaks ties."""
    gh, gw = obj.shape
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    f = np.stack([obj, 1 - obj, 0.05 * ys / gh, 0.05 * xs / gw], axis=-1).reshape(-1, 4)
    return F.normalize(torch.tensor(f, dtype=torch.float32), dim=-1)


def square_grid(n: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.float64)
    m[y : y + side, x : x + side] = 1
    return m


def test_neighborhood_mask() -> None:
    m = neighborhood_mask(3, 3, 1)
    assert m.shape == (9, 9) and bool(m[0, 4]) and not bool(m[0, 8])


def test_propagation_tracks_moving_object() -> None:
    n, side = 8, 2
    first = square_grid(n, 1, 1, side)
    seg0 = torch.tensor(np.stack([1 - first, first]).reshape(2, -1), dtype=torch.float32)
    feat0 = one_hot_features(first)
    neigh = neighborhood_mask(n, n, 3)
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in range(1, 5):
        truth = square_grid(n, 1 + t, 1 + t, side)  # moves one patch down-right per frame
        feat = one_hot_features(truth)
        seg = propagate(feat, [feat0] + [q[0] for q in queue], [seg0] + [q[1] for q in queue], 5, 0.1, neigh)
        queue = [*queue, (feat, seg)][-2:]
        pred = seg.argmax(0).reshape(n, n).numpy()
        inter = np.logical_and(pred == 1, truth == 1).sum()
        union = np.logical_or(pred == 1, truth == 1).sum()
        assert inter / union == 1.0
        assert torch.allclose(seg.sum(0), torch.ones(n * n))  # soft labels stay a distribution


class ThresholdBackbone(nn.Module):
    """Patch features from image brightness: bright patches are "object", so tracking should be exact."""

    patch_size = 4

    def grid_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // 4, size[1] // 4

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        obj = (F.avg_pool2d(x[:, :1], 4) > 0).float()
        b, _, gh, gw = obj.shape
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pos = torch.stack([ys, xs]).float().expand(b, 2, gh, gw) * 0.01
        feat = torch.cat([obj, 1 - obj, pos], dim=1).flatten(2).transpose(1, 2)
        return {"cls": feat.mean(1), "patch": feat}


def make_davis(root: Path, n_frames: int = 3, videos: tuple[str, ...] = ("toy",)) -> None:
    """Videos of a bright 8x8 square moving right one patch per frame; videos after the first start
    lower and add a static second object, so each video scores differently."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{v}\n" for v in videos))
    for k, video in enumerate(videos):
        img_dir, ann_dir = root / "JPEGImages" / "480p" / video, root / "Annotations" / "480p" / video
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t in range(n_frames):
            labels = np.zeros((32, 32), dtype=np.uint8)
            labels[8 + 4 * k : 16 + 4 * k, 4 + 4 * t : 12 + 4 * t] = 1
            if k > 0:
                labels[26:31, 1:7] = 2
            Image.fromarray(np.repeat((labels[..., None] > 0) * np.uint8(255), 3, axis=2)).save(
                img_dir / f"{t:05d}.jpg", quality=95
            )
            Image.frombytes("P", (32, 32), labels.tobytes()).save(ann_dir / f"{t:05d}.png")


def test_run_tracks_with_threshold_backbone(tmp_path: Path) -> None:
    make_davis(tmp_path / "davis", n_frames=4)
    cfg = DavisConfig(root=str(tmp_path / "davis"), output_dir=str(tmp_path / "out"), device="cpu")
    out = run(ThresholdBackbone(), cfg)  # type: ignore[arg-type]
    assert out["davis_j_mean"] > 90.0 and out["davis_jf_mean"] > 90.0
    written = sorted((tmp_path / "out" / "toy").glob("*.png"))
    assert len(written) == 4 and Image.open(written[1]).mode == "P"


def test_run_vit_test_backbone(tmp_path: Path) -> None:
    make_davis(tmp_path / "davis")
    cfg = DavisConfig(root=str(tmp_path / "davis"), output_dir=str(tmp_path / "out"), device="cpu")
    out = get_evaluator("davis").run(create_backbone("vit_test"), cfg)
    assert set(out) == {"davis_jf_mean", "davis_j_mean", "davis_f_mean"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in out.values())  # percentages
    assert len(list((tmp_path / "out" / "toy").glob("*.png"))) == 3


def test_batched_frames_equal_one_at_a_time_and_sizes_must_agree(tmp_path: Path) -> None:
    make_davis(tmp_path / "davis", n_frames=5)
    torch.manual_seed(0)
    backbone = create_backbone("vit_test")
    outs = []
    for batch in (1, 3):
        out_dir = str(tmp_path / f"o{batch}")
        cfg = DavisConfig(root=str(tmp_path / "davis"), output_dir=out_dir, batch_size=batch, device="cpu")
        outs.append(run(backbone, cfg))
    assert outs[0] == pytest.approx(outs[1], abs=1e-6)
    for name in ("00000.png", "00004.png"):
        a, b = (np.asarray(Image.open(tmp_path / f"o{k}" / "toy" / name)) for k in (1, 3))
        assert np.array_equal(a, b)
    frame = sorted((tmp_path / "davis" / "JPEGImages" / "480p" / "toy").glob("*.jpg"))[3]
    Image.new("RGB", (40, 32)).save(frame)
    with pytest.raises(ValueError, match=r"00003\.jpg: frame size differs"):
        run(backbone, DavisConfig(root=str(tmp_path / "davis"), output_dir=str(tmp_path / "o"), device="cpu"))
