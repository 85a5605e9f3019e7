"""Batched decoding (sopvit.data.decode) pinned to its documented contract beyond test_decode.py.

- one ``decode_jpeg`` call per batch and device, in the requested mode and on the requested device, with
  a one-by-one retry (same mode and device) only when the batched call fails;
- images end up on the requested device whichever path decoded them. The tests use the ``meta`` device
  as a CPU-only stand-in for an accelerator: torchvision decodes on the CPU for any non-CUDA device, so
  every image must be moved there explicitly;
- bad files are remembered by path (like ``ImageFolderDataset`` remembers them by index), replacements
  are upright and counted as PIL fallbacks only when PIL decoded them;
- only DecompressionBombWarning counts as a defect in the header check, and only torchvision's
  DeprecationWarning is silenced around ``decode_jpeg``.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

import sopvit.data.decode as decode_mod
from sopvit.data.decode import BatchDecoder, FileBytesDataset, _jpeg_plan
from sopvit.data.image_folder import ImageFolderDataset

CPU = torch.device("cpu")
META = torch.device("meta")


def _jpeg(w: int, h: int, seed: int = 0, mode: str = "RGB", **kw: Any) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def _exif6() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def _broken_exif() -> bytes:
    """EXIF with orientation 6 and a tag pointing past the data (PIL warns and skips that tag)."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 2)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">HHII", 0x010E, 2, 100, 1000)
    return b"Exif\x00\x00" + tiff + b"\x00" * 4


def _folder(root: Path, files: dict[str, bytes]) -> tuple[ImageFolderDataset, FileBytesDataset]:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
    folder = ImageFolderDataset(root)
    return folder, FileBytesDataset(folder)


def _quiet(
    decoder: BatchDecoder, items: list[Any], data: FileBytesDataset, device: torch.device, c: int = 3
) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return decoder(items, data, device, c)


def test_file_bytes_negative_index_and_unreadable_file(tmp_path: Path) -> None:
    _, data = _folder(tmp_path, {"a.png": _png(3, 2), "b.png": _png(2, 2)})
    assert data[-2]["index"] == 0 and bytes(data[-2]["data"].numpy()) == (tmp_path / "a.png").read_bytes()
    with pytest.raises(IndexError):
        data[-3]
    (tmp_path / "b.png").unlink()
    empty = data[1]["data"]
    assert empty.dtype == torch.uint8 and empty.shape == (0,)


def test_grey_jpeg_goes_to_the_device() -> None:
    cuda = torch.device("cuda")  # only compared, never used
    grey = torch.frombuffer(bytearray(_jpeg(8, 8, mode="L")), dtype=torch.uint8)
    assert _jpeg_plan(grey, cuda) == (1, cuda)


def _malformed_mpo() -> bytes:
    """A JPEG with an MPF APP2 segment lacking the image count: PIL warns and reads it as a plain JPEG."""
    payload = b"MPF\x00MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 0) + b"\x00" * 4
    jpeg = _jpeg(8, 16, seed=7)
    return jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize(
    ("content", "orientation"), [(_jpeg(16, 8, exif=_broken_exif()), 6), (_malformed_mpo(), 1)]
)
def test_pil_header_warnings_are_no_defect(tmp_path: Path, content: bytes, orientation: int) -> None:
    """PIL's warnings about a broken EXIF tag or MPO index do not send the JPEG to PIL; it is decoded
    by torchvision, upright, as the per-sample path decodes it."""
    folder, data = _folder(tmp_path, {"x.jpg": content})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert _jpeg_plan(data[0]["data"], CPU) == (orientation, CPU)
        out = BatchDecoder()([data[0]], data, CPU, 3)
        ref = pil_to_tensor(folder[0]["image"])
    assert out.cpu_fallbacks == 0 and out.skipped == 0
    assert out.images[0].shape == (3, 16, 8) and torch.equal(out.images[0], ref)


class _Spy:
    """Wraps decode_jpeg: records (input kind, length, kwargs), warns once per call, can refuse batches."""

    def __init__(self, refuse_batches: bool = False) -> None:
        self.calls: list[tuple[str, int, dict[str, Any]]] = []
        self.refuse_batches = refuse_batches

    def __call__(self, inp: Any, **kw: Any) -> Any:
        kind = "list" if isinstance(inp, list) else type(inp).__name__
        self.calls.append((kind, len(inp) if isinstance(inp, list) else 1, kw))
        warnings.warn("decoder note", UserWarning, stacklevel=2)
        if self.refuse_batches and isinstance(inp, list) and len(inp) > 1:
            raise RuntimeError("no batches today")
        return decode_jpeg(inp, **kw)


def test_one_decode_jpeg_call_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"{i}.jpg": _jpeg(8 + 4 * i, 8, seed=i) for i in range(3)}
    folder, data = _folder(tmp_path, files)
    spy = _Spy()
    monkeypatch.setattr(decode_mod, "decode_jpeg", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = BatchDecoder()([data[i] for i in range(3)], data, CPU, 3)
    assert spy.calls == [("list", 3, {"mode": ImageReadMode.RGB, "device": CPU})]
    assert [str(w.message) for w in caught if w.category is UserWarning] == ["decoder note"]
    for i, img in enumerate(out.images):
        assert torch.equal(img, pil_to_tensor(folder[i]["image"]))


def test_refused_batch_is_retried_one_by_one_in_the_same_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"{i}.jpg": _jpeg(8 + 4 * i, 8, seed=i) for i in range(2)}
    _, data = _folder(tmp_path, files)
    spy = _Spy(refuse_batches=True)
    monkeypatch.setattr(decode_mod, "decode_jpeg", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = BatchDecoder()([data[0], data[1]], data, CPU, 1)
    kw = {"mode": ImageReadMode.GRAY, "device": CPU}
    assert spy.calls == [("list", 2, kw), ("Tensor", 1, kw), ("Tensor", 1, kw)]
    assert [tuple(img.shape) for img in out.images] == [(1, 8, 8), (1, 8, 12)]
    assert out.cpu_fallbacks == 0


def test_images_land_on_the_requested_device(tmp_path: Path) -> None:
    """Every path (device JPEG, CPU CMYK JPEG, PIL, and the replacements of bad files) returns images on
    the requested device; replacements decoded by torchvision are no PIL fallbacks."""
    files = {
        "a.jpg": b"garbage, not a JPEG",
        "b.jpg": _jpeg(12, 8, seed=1),
        "c.jpg": b"garbage again",
        "d.png": _png(5, 7),
        "e.jpg": _jpeg(10, 6, seed=2, mode="CMYK"),
    }
    _, data = _folder(tmp_path, files)
    out = _quiet(BatchDecoder(), [data[i] for i in range(5)], data, META)
    assert out.indices.tolist() == [1, 1, 3, 3, 4] and out.skipped == 2
    assert out.cpu_fallbacks == 2  # d.png as itself and as c.jpg's replacement
    assert [img.device for img in out.images] == [META] * 5
    assert [tuple(img.shape) for img in out.images] == [
        (3, 8, 12),
        (3, 8, 12),
        (3, 7, 5),
        (3, 7, 5),
        (3, 6, 10),
    ]


def test_bad_files_are_remembered_like_image_folder(tmp_path: Path) -> None:
    """A file found bad stays bad for this decoder even once it is rewritten complete."""
    good = _jpeg(8, 8, seed=3)
    folder, data = _folder(tmp_path, {"a.jpg": good[: len(good) // 2], "b.jpg": _jpeg(8, 8, seed=4)})
    decoder = BatchDecoder()
    first = _quiet(decoder, [data[0]], data, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert folder[0]["skipped"] == 1
    (tmp_path / "a.jpg").write_bytes(good)
    second = _quiet(decoder, [data[0]], data, CPU)
    assert (first.indices.item(), first.skipped) == (second.indices.item(), second.skipped) == (1, 1)
    assert (folder[0]["index"], folder[0]["skipped"]) == (1, 1)
    assert BatchDecoder()([data[0]], data, CPU, 3).skipped == 0  # a fresh decoder reads the new file


def test_replacement_search_past_known_bad_files(tmp_path: Path) -> None:
    """Passing a file already known bad is a skip, not a PIL fallback."""
    _, data = _folder(tmp_path, {"a.jpg": b"bad", "b.jpg": b"bad too", "c.jpg": _jpeg(8, 8, seed=5)})
    decoder = BatchDecoder()
    first = _quiet(decoder, [data[1]], data, CPU)
    assert (first.indices.item(), first.skipped, first.cpu_fallbacks) == (2, 1, 0)
    second = _quiet(decoder, [data[0]], data, CPU)
    assert (second.indices.item(), second.skipped, second.cpu_fallbacks) == (2, 2, 0)


def test_replacement_jpeg_is_upright(tmp_path: Path) -> None:
    folder, data = _folder(tmp_path, {"a.jpg": b"bad", "b.jpg": _jpeg(16, 8, seed=6, exif=_exif6())})
    out = _quiet(BatchDecoder(), [data[0]], data, CPU)
    assert out.indices.item() == 1 and out.cpu_fallbacks == 0
    assert out.images[0].shape == (3, 16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert torch.equal(out.images[0], pil_to_tensor(folder[0]["image"]))


def test_empty_file_reason(tmp_path: Path) -> None:
    _, data = _folder(tmp_path, {"empty.jpg": b"", "ok.png": _png(2, 2)})
    with pytest.warns(RuntimeWarning, match=r"empty\.jpg' \(OSError: no bytes: the file is empty"):
        out = BatchDecoder()([data[0]], data, CPU, 3)
    assert out.indices.item() == 1 and out.skipped == 1
