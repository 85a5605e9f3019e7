"""DAVIS-2017 semi-supervised video object segmentation by label propagation (DINO's protocol).

Expected layout under ``root``: ``ImageSets/2017/<split>.txt`` (one video per line),
``JPEGImages/480p/<video>/*.jpg`` and ``Annotations/480p/<video>/*.png`` (indexed PNGs, 0 = background,
1..K = objects; only the first frame's annotation is used as input, the rest for scoring).

Each frame's last-block patch features (L2-normalised) attend to the first frame and the ``n_last_frames``
previous frames; each target patch keeps its ``topk`` most similar source patches within a square
window of ``size_mask_neighborhood`` patches, weighted by exp(cos / temperature), and averages their soft
labels. Predictions are written as indexed PNGs under ``output_dir/<video>/``. Scores are percentages
in [0, 100]; as in davis2017-evaluation the first and last frames are not scored. Under torchrun each
rank tracks a strided share of the videos and the per-object scores are gathered, so all ranks agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sopvit.config.coerce import check
from sopvit.data.transforms import MultiCropSpec
from sopvit.device import autocast, resolve_device
from sopvit.distributed import all_gather_rows, shard
from sopvit.eval.davis_metrics import boundary_f, global_means, object_mean, region_similarity
from sopvit.eval.registry import register
from sopvit.models import Backbone


@dataclass
class DavisConfig:
    root: str = ""
    split: str = "val"
    output_dir: str = "davis_out"
    n_last_frames: int = 7
    size_mask_neighborhood: int = 12  # patches; 0 disables the spatial restriction
    topk: int = 5
    temperature: float = 0.1
    image_size: int | None = None  # shorter side before rounding to the patch size; None: native
    batch_size: int = 8  # frames per forward pass
    device: str = "auto"

    def validate(self) -> None:
        check(bool(self.root), "root", "is required")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.n_last_frames >= 0, "n_last_frames", "must be >= 0")
        check(self.size_mask_neighborhood >= 0, "size_mask_neighborhood", "must be >= 0")
        check(self.topk >= 1, "topk", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.image_size is None or self.image_size > 0, "image_size", "must be > 0 or null")


def davis_palette() -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map (256 x 3 uint8), built by spreading index bits over RGB."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def neighborhood_mask(gh: int, gw: int, radius: int) -> torch.Tensor:
    """(L, L) bool: target patch i may use source patch j if both grid offsets are <= radius."""
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)


def propagate(
    feat_tar: torch.Tensor,
    feat_src: Sequence[torch.Tensor],
    seg_src: Sequence[torch.Tensor],
    topk: int,
    temperature: float,
    neighborhood: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft labels (C, L) of a target frame from source frames.

    ``feat_tar``: (L, D) unit-norm features; ``feat_src[i]``: (L, D); ``seg_src[i]``: (C, L) soft labels;
    ``neighborhood``: optional (L_tar, L_src) bool mask of allowed source patches.
    """
    if len(feat_src) != len(seg_src) or not feat_src:
        raise ValueError(
            f"need matching, non-empty sources; got {len(feat_src)} features, {len(seg_src)} labels"
        )
    aff = torch.exp(torch.einsum("td,nsd->nts", feat_tar, torch.stack(list(feat_src))) / temperature)
    if neighborhood is not None:
        aff = aff * neighborhood.to(aff.dtype)
    n, lt, ls = aff.shape
    aff = aff.permute(0, 2, 1).reshape(n * ls, lt)  # (all source patches, target patches)
    k = min(topk, aff.shape[0])
    kth = aff.topk(k, dim=0).values.min(dim=0).values
    # Keep only each target's top-k sources; ties with the k-th value survive, as in DINO.
    aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
    aff = aff / aff.sum(dim=0, keepdim=True).clamp_min(1e-12)
    segs = torch.cat([s for s in seg_src], dim=1)  # (C, n * L_src), same source order as aff
    return segs @ aff


def _norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per-class min-max rescaling before argmax (DINO's ``norm_mask``) so weak objects are not swamped."""
    out = mask.clone()
    for c in range(mask.shape[0]):
        lo, hi = mask[c].min(), mask[c].max()
        if hi > 0:
            out[c] = (mask[c] - lo) / (hi - lo).clamp_min(1e-12)
    return out


def _frame_size(w: int, h: int, patch: int, image_size: int | None) -> tuple[int, int]:
    if image_size is not None:
        ratio = image_size / min(w, h)
        w, h = round(w * ratio), round(h * ratio)
    return max(patch, w - w % patch), max(patch, h - h % patch)


def _frame_tensor(path: Path, size: tuple[int, int]) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    mean, std = MultiCropSpec(in_chans=3).stats
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.inference_mode()
def video_features(
    backbone: Backbone, frames: list[Path], cfg: DavisConfig, device: torch.device
) -> Iterator[torch.Tensor]:
    """(L, D) unit-norm last-block patch features of each frame, computed ``cfg.batch_size`` frames at a time.

    Every frame is resized like the first (a video's frames share one size; one that differs is an error).
    """
    w0, h0 = Image.open(frames[0]).size
    size = _frame_size(w0, h0, backbone.patch_size, cfg.image_size)
    bf16 = autocast(device)
    for start in range(0, len(frames), cfg.batch_size):
        chunk = frames[start : start + cfg.batch_size]
        for path in chunk:
            if Image.open(path).size != (w0, h0):
                raise ValueError(f"{path}: frame size differs from the first frame of its video")
        x = torch.stack([_frame_tensor(p, size) for p in chunk]).to(device)
        with bf16:
            out = backbone(x)["patch"].float()
        yield from F.normalize(out, dim=-1)  # stays on device: propagation is the costly part


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"annotation not found: {path}")
    return np.asarray(Image.open(path), dtype=np.uint8)


def track_video(
    backbone: Backbone, frames: list[Path], first: np.ndarray, cfg: DavisConfig, device: torch.device
) -> list[np.ndarray]:
    """Predicted label maps (original resolution) for frames[1:], propagated from ``first``."""
    w0, h0 = Image.open(frames[0]).size
    fw, fh = _frame_size(w0, h0, backbone.patch_size, cfg.image_size)
    gh, gw = backbone.grid_size((fh, fw))
    n_cls = int(first.max()) + 1
    small = np.asarray(Image.fromarray(first).resize((gw, gh), Image.Resampling.NEAREST), dtype=np.int64)
    seg0 = F.one_hot(torch.from_numpy(small).flatten(), n_cls).T.float().to(device)  # (C, L)
    features = video_features(backbone, frames, cfg, device)
    feat0 = next(features)
    radius = cfg.size_mask_neighborhood
    neigh = neighborhood_mask(gh, gw, radius).to(device) if radius > 0 else None
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    preds = []
    for feat in features:
        seg = propagate(
            feat,
            [feat0] + [q[0] for q in queue],
            [seg0] + [q[1] for q in queue],
            cfg.topk,
            cfg.temperature,
            neigh,
        )
        if cfg.n_last_frames > 0:
            queue = [*queue, (feat, seg)][-cfg.n_last_frames :]
        up = F.interpolate(seg.view(1, n_cls, gh, gw), size=(fh, fw), mode="bilinear", align_corners=False)[0]
        labels = _norm_mask(up).argmax(0).cpu().numpy().astype(np.uint8)
        preds.append(np.asarray(Image.fromarray(labels).resize((w0, h0), Image.Resampling.NEAREST)))
    return preds


def _write_indexed(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    h, w = labels.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    img.putpalette(palette.flatten().tolist())
    img.save(path)


def _video_frames(root: Path, video: str) -> list[Path]:
    frames = sorted((root / "JPEGImages" / "480p" / video).glob("*.jpg"))
    if len(frames) < 2:
        raise ValueError(f"{root / 'JPEGImages' / '480p' / video}: need at least 2 .jpg frames")
    first_ann = root / "Annotations" / "480p" / video / f"{frames[0].stem}.png"
    if not first_ann.is_file():
        raise FileNotFoundError(f"annotation not found: {first_ann}")
    return frames


def score_video(
    backbone: Backbone, root: Path, video: str, frames: list[Path], cfg: DavisConfig, device: torch.device
) -> list[tuple[float, float]]:
    """Track one video, write its PNGs under ``output_dir/<video>/``; (J, F) mean of each object."""
    ann_dir = root / "Annotations" / "480p" / video
    first = _read_labels(ann_dir / f"{frames[0].stem}.png")
    preds = track_video(backbone, frames, first, cfg, device)
    out_dir = Path(cfg.output_dir) / video
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = davis_palette()
    for path, labels in zip(frames, [first, *preds], strict=True):
        _write_indexed(out_dir / f"{path.stem}.png", labels, palette)
    # davis2017-evaluation scores frames 1..n-2; two-frame videos keep their only predicted frame.
    scored = list(zip(frames[1:], preds, strict=True))
    scored = scored[:-1] if len(scored) > 1 else scored
    objects = []
    for obj in range(1, int(first.max()) + 1):
        j_obj, f_obj = [], []
        for path, pred in scored:
            gt_path = ann_dir / f"{path.stem}.png"
            if not gt_path.is_file():
                continue  # unannotated frame: not scored
            gt = _read_labels(gt_path) == obj
            j_obj.append(region_similarity(pred == obj, gt))
            f_obj.append(boundary_f(pred == obj, gt))
        objects.append((object_mean(j_obj), object_mean(f_obj)))
    return objects


@register("davis", DavisConfig, "DAVIS-2017 video segmentation by label propagation (J&F)")
def run(backbone: Backbone, cfg: DavisConfig) -> dict[str, float]:
    cfg.validate()
    root = Path(cfg.root)
    list_file = root / "ImageSets" / "2017" / f"{cfg.split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"DAVIS video list not found: {list_file}")
    videos = [v.strip() for v in list_file.read_text().splitlines() if v.strip()]
    if not videos:
        raise ValueError(f"{list_file} lists no videos")
    # Every rank checks every video before tracking: a rank failing alone would leave the others waiting.
    frames = [_video_frames(root, v) for v in videos]
    device = resolve_device(cfg.device)
    backbone = backbone.to(device).eval()
    # Videos are independent: rank r tracks videos r, r+W, ... and sends one (video, J, F) row per object.
    rows = [
        (float(i), j, f)
        for i in shard(len(videos))
        for j, f in score_video(backbone, root, videos[i], frames[i], cfg, device)
    ]
    local = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)  # float64: means stay bit-exact
    gathered = all_gather_rows(local.to(device)).cpu()
    # Stable sort by video restores the single-process object order (a video's rows arrive together).
    gathered = gathered[torch.sort(gathered[:, 0], stable=True).indices]
    if not len(gathered):
        raise ValueError(f"no objects found in the first-frame annotations under {root / 'Annotations'}")
    m = global_means(gathered[:, 1].tolist(), gathered[:, 2].tolist())
    return {f"davis_{k}": 100 * m[k] for k in ("jf_mean", "j_mean", "f_mean")}
