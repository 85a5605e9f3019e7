"""Frozen-feature extraction for the offline protocols, sharded over ranks and cached on disk by content."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from sopvit.checkpoints.safe_load import load_torch
from sopvit.config import check
from sopvit.data.datasets import DATASET_NAMES, InMemoryDataset, build_dataset
from sopvit.data.eval_transforms import EvalTransform
from sopvit.data.seeding import SeededSamples
from sopvit.data.transforms import MultiCropSpec
from sopvit.device import autocast, resolve_device
from sopvit.distributed import all_reduce_min, barrier, gather_shards, is_main_process, shard
from sopvit.eval.features import tensor_batches
from sopvit.models import Backbone

_LAYERS = re.compile(r"^(cls|cls\+avgpool|last[1-9][0-9]*)$")


@dataclass
class EvalDataConfig:
    """Fields every offline protocol shares: which images, at what resolution, where features are cached."""

    dataset: str = "fashion_mnist"  # a build_dataset name
    path: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = 28  # evaluation resolution (224 for the ImageNet protocols)
    in_chans: int = 1
    batch_size: int = 256  # extraction batch
    limit: int | None = None  # first N images of each split (smoke tests)
    device: str = "auto"
    cache_dir: str | None = None  # None: never cache

    def validate(self) -> None:
        check(self.dataset in DATASET_NAMES, "dataset", f"must be one of {', '.join(DATASET_NAMES)}")
        check(
            self.path is not None or self.dataset not in ("folder", "imagenet", "shards"),
            "path",
            "required for folders and shards",
        )
        check(self.image_size > 0, "image_size", "must be > 0")
        check(self.in_chans in (1, 3), "in_chans", "must be 1 or 3")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or null")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device", "unknown")


def backbone_fingerprint(backbone: nn.Module) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes): any weight change changes it.

    Hashing all bytes rather than a sample costs ~0.1 s per 100 MB and rules out silent reuse of the
    features of a checkpoint that differs only in tensors a sample would miss.
    """
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # through uint8 so bfloat16 (which numpy lacks) hashes too
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    arch = {k: getattr(backbone, k, None) for k in ("arch", "timm_name", "timm_kwargs", "kind")}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cached_features(
    backbone: nn.Module,
    key_parts: dict[str, Any],
    compute: Callable[[], tuple[Tensor, Tensor]],
    cache_dir: str | None,
) -> tuple[Tensor, Tensor]:
    """``compute()``'s (features, labels), stored under a hash of the weights and ``key_parts``."""
    if cache_dir is None:
        return compute()
    key_json = json.dumps(
        {"backbone": backbone_fingerprint(backbone), **key_parts}, sort_keys=True, default=str
    )
    key = hashlib.sha256(key_json.encode()).hexdigest()
    file = os.path.join(cache_dir, f"features-{key[:32]}.pt")
    # every rank must agree: extraction is collective, so one rank hitting alone would deadlock the others
    hit = all_reduce_min(torch.tensor([int(os.path.isfile(file))]))
    if bool(hit.item()):
        stored = load_torch(file)
        if stored.get("key") == key_json:  # the 32-char prefix could in principle collide
            return stored["features"], stored["labels"]
    features, labels = compute()
    if is_main_process():
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{file}.tmp{os.getpid()}"
        torch.save({"key": key_json, "features": features, "labels": labels}, tmp)
        os.replace(tmp, file)  # atomic: a crash never leaves a truncated cache entry behind
    barrier()
    return features, labels


def check_in_chans(backbone: Backbone, in_chans: int) -> None:
    """A clear error instead of torch's conv2d shape message when the data and the backbone disagree."""
    proj = getattr(getattr(backbone.model, "patch_embed", None), "proj", None)
    expected = getattr(proj, "in_channels", in_chans)
    if expected != in_chans:
        raise ValueError(
            f"in_chans: the evaluation reads {in_chans}-channel images but the backbone takes {expected}; "
            f"set in_chans={expected} (and image_size to the backbone's resolution, e.g. 224 for ImageNet)"
        )


def check_layers(layers: str, allow_auto: bool = False) -> None:
    """Config check of a ``layers`` field: "cls", "cls+avgpool", "lastN" (and "auto" where allowed)."""
    ok = bool(_LAYERS.match(layers)) or (allow_auto and layers == "auto")
    check(ok, "layers", "must be 'cls', 'cls+avgpool' or 'lastN'" + (" or 'auto'" if allow_auto else ""))


def resolve_layers(layers: str, backbone: Backbone) -> str:
    """ "auto" -> the paper's linear-probe features: ViT-B/L (width >= 768) [CLS] + mean patch token;
    smaller ViTs the [CLS] of the last 4 blocks (fewer on shallower models); Swin its pooled token."""
    if layers != "auto":
        return layers
    blocks = getattr(backbone.model, "blocks", None)
    if backbone.kind != "vit" or blocks is None:
        return "cls"
    return "cls+avgpool" if backbone.embed_dim >= 768 else f"last{min(4, len(blocks))}"


def feature_dim(backbone: Backbone, layers: str) -> int:
    """Width of ``layer_features``'s rows, known without a forward pass (a rank may hold no image)."""
    if layers == "cls":
        return backbone.embed_dim
    if layers == "cls+avgpool":
        return 2 * backbone.embed_dim
    return int(layers[4:]) * backbone.embed_dim


def layer_features(backbone: Backbone, x: Tensor, layers: str) -> Tensor:
    if layers == "cls":
        return backbone(x)["cls"]
    if layers == "cls+avgpool":
        out = backbone(x)
        return torch.cat([out["cls"], out["patch"].mean(1)], dim=-1)
    blocks = backbone.get_intermediate_layers(x, int(layers[4:]), norm=True)
    return torch.cat([b[:, 0] for b in blocks], dim=-1)


@torch.inference_mode()
def extract_dataset_features(
    backbone: Backbone,
    dataset_name: str,
    path: str | None,
    split: str,
    image_size: int,
    in_chans: int,
    batch_size: int,
    limit: int | None,
    device: torch.device,
    layers: str = "cls",
    transform: Callable[[Any], Tensor] | None = None,
    transform_seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Raw float32 features (N, F) and labels (N,) of a split, in data-set order.

    layers: "cls" (final-normed [CLS]), "lastN" ([CLS] of the last N blocks, each final-normed,
    concatenated) or "cls+avgpool" ([CLS] + mean patch token of the last block).
    transform: per-image preprocessing replacing the deterministic one (e.g. random crops for an
    augmented linear probe); it must return normalised (C, image_size, image_size) tensors.
    transform_seed: seeds a random ``transform`` per image, by (transform_seed, image index), so the views
    do not depend on the batch size, the loader's workers or the number of ranks.
    """
    if not _LAYERS.match(layers):
        raise ValueError(f"layers must be 'cls', 'cls+avgpool' or 'lastN', got {layers!r}")
    check_in_chans(backbone, in_chans)
    blocks = getattr(backbone.model, "blocks", None)
    if layers.startswith("last") and blocks is not None and int(layers[4:]) > len(blocks):
        raise ValueError(f"layers={layers!r} needs {layers[4:]} blocks; this backbone has {len(blocks)}")
    in_memory = transform is None and dataset_name in ("fashion_mnist", "cifar10", "cifar100")
    if transform is None and not in_memory:
        transform = EvalTransform(image_size, in_chans=in_chans)
    ds = build_dataset(dataset_name, path, split, transform=transform, limit=limit)
    if transform_seed is not None:
        ds = SeededSamples(ds, transform_seed)
    n = len(cast(Any, ds))
    mine = torch.tensor(shard(n), dtype=torch.long)
    mean, std = MultiCropSpec(in_chans=in_chans).stats
    batches: Iterator[Tensor]
    if in_memory and isinstance(ds, InMemoryDataset):
        batches = tensor_batches(ds.images[mine], batch_size, mean, std, image_size)
        label_parts = [ds.labels[mine]]
    else:
        sub = Subset(cast(Dataset[dict[str, Any]], ds), mine.tolist())
        loader: DataLoader[dict[str, Any]] = DataLoader(sub, batch_size=batch_size, num_workers=2)
        label_parts = []

        def from_loader() -> Iterator[Tensor]:
            for b in loader:
                label_parts.append(torch.as_tensor(b["label"]))
                yield b["image"]

        batches = from_loader()
    was_training = backbone.training
    backbone.eval().to(device)
    bf16 = autocast(device)
    feats = []
    with bf16:
        for x in batches:
            feats.append(layer_features(backbone, x.to(device, non_blocking=True), layers).float())
    backbone.train(was_training)
    # a rank whose shard is empty (fewer images than ranks) still joins the gathers with (0, F) rows
    local = torch.cat(feats) if feats else torch.empty(0, feature_dim(backbone, layers), device=device)
    local_labels = torch.cat(label_parts) if label_parts else torch.empty(0, dtype=torch.long)
    features = gather_shards(local, n).cpu()
    bad = int((~torch.isfinite(features).all(dim=1)).sum())
    if bad:  # every rank sees the gathered rows, so all raise together
        raise ValueError(
            f"{bad} of {n} feature rows of split {split!r} are NaN or Inf: the backbone's weights are not "
            "finite (a damaged or diverged checkpoint)"
        )
    return features, gather_shards(local_labels.long().to(device), n).cpu()


def split_features(backbone: Backbone, cfg: EvalDataConfig, split: str, layers: str) -> tuple[Tensor, Tensor]:
    """Features of one split of ``cfg``'s data set, from the cache when the weights and inputs match."""
    key = {
        "dataset": cfg.dataset,
        "path": os.path.abspath(cfg.path) if cfg.path else None,
        "split": split,
        "image_size": cfg.image_size,
        "in_chans": cfg.in_chans,
        "limit": cfg.limit,
        "layers": layers,
    }

    def compute() -> tuple[Tensor, Tensor]:
        return extract_dataset_features(
            backbone,
            cfg.dataset,
            cfg.path,
            split,
            cfg.image_size,
            cfg.in_chans,
            cfg.batch_size,
            cfg.limit,
            resolve_device(cfg.device),
            layers,
        )

    return cached_features(backbone, key, compute, cfg.cache_dir)
