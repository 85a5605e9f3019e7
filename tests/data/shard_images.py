"""Small image folders (labelled, flat, with bad files) for the tar-shard tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch
from PIL import Image


def labelled_folder(
    root: Path, per_class: int = 10, classes: tuple[str, ...] = ("ant", "bee", "cat")
) -> Path:
    """``per_class`` images in each class subfolder: RGB and grayscale JPEGs of three sizes, a PNG, and
    two bad files (a corrupt JPEG and a zero-byte one) that every reader must skip the same way."""
    g = torch.Generator().manual_seed(len(classes) * 100 + per_class)
    sizes = [(40, 30), (30, 44), (24, 24)]
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(i + c) % 3]
            image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
            if i % 4 == 1:
                image = image.convert("L")
            if i == 5:
                image.save(folder / f"img{i:02d}.png")
            else:
                image.save(folder / f"img{i:02d}.jpg", quality=90)
    (root / classes[0] / "img03.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)))
    (root / classes[1] / "img07.jpg").write_bytes(b"")
    return root


def flat_folder(root: Path, n: int = 9) -> Path:
    """``n`` unlabelled JPEGs directly in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        pixels = (torch.rand(20, 28, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(root / f"{i:03d}.jpg", quality=85)
    return root


def tar_of(path: Path, members: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A tar holding ``members`` (name -> bytes) in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg_bytes(size: tuple[int, int] = (16, 12)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(out, format="JPEG")
    return out.getvalue()
