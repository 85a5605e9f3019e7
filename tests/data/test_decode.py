"""Batched decoding (sopvit.data.decode) against the per-sample PIL path of ImageFolderDataset.

Tolerance: everything is bit-exact except a colour JPEG decoded with in_chans=1. The batched path asks
libjpeg (or nvJPEG) for the luma plane Y the encoder stored (Y = .299 R + .587 G + .114 B, computed from
the original pixels at full resolution), while PIL decodes to RGB first (chroma upsampled, each channel
rounded and clipped to 0..255) and then applies the same weights in fixed point. The two agree up to
rounding (±1) except where the decoded RGB clips (saturated colours). Measured on these images: at most
3 levels apart, mean |diff| < 0.001; asserted: mean |diff| < 0.1 and |diff| <= 1 for 99.9% of pixels.
(A grey JPEG, and a CMYK one, which libjpeg converts like PIL, are exact.)
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

import sopvit.data.decode as decode_mod
from sopvit.data.decode import BatchDecoder, FileBytesDataset, _jpeg_plan
from sopvit.data.image_folder import ImageFolderDataset, decode_image

CPU = torch.device("cpu")
MODES = {1: "L", 3: "RGB"}
BASELINE = ["a/jpg_500x375.jpg", "a/jpg_320x480.jpg", "a/jpg_64x48.jpg"]
# Readable files that are JPEGs (by content) and the rest; the bad ones are in b/.
JPEGS = [*BASELINE, "a/gray.jpg", "a/cmyk.jpg", "a/progressive.jpg", "a/exif3.jpg", "a/exif6.jpg"]
OTHERS = ["b/rgb.png", "b/rgba.png", "b/palette.png", "b/i16.png", "b/img.webp", "b/img.bmp", "b/img.gif"]
BAD = ["b/trunc.jpg", "b/garbage.jpg", "b/empty.jpg"]
COLOUR_JPEGS = {*BASELINE, "a/cmyk.jpg", "a/progressive.jpg", "a/exif3.jpg", "a/exif6.jpg"}


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: a smooth random colour field plus mild noise, compressing like a photo."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 255, (1, 3, max(h // 16, 2), max(w // 16, 2))).astype(np.float32))
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0].permute(1, 2, 0).numpy()
    return np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)


def _save(path: Path, img: Image.Image, fmt: str | None = None, **kw: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("decode")
    rgb = Image.fromarray(_photo(500, 375, 0))
    for name, (w, h) in zip(BASELINE, [(500, 375), (320, 480), (64, 48)], strict=True):
        _save(root / name, Image.fromarray(_photo(w, h, w)), quality=90)
    _save(root / "a/gray.jpg", rgb.convert("L"), quality=90)
    _save(root / "a/cmyk.jpg", rgb.convert("CMYK"), "JPEG", quality=90)
    _save(root / "a/progressive.jpg", rgb, quality=90, progressive=True)
    small = Image.fromarray(_photo(120, 80, 3))
    for o in (3, 6):
        _save(root / f"a/exif{o}.jpg", small, quality=90, exif=_exif(o))
    _save(root / "b/rgb.png", rgb)
    _save(root / "b/rgba.png", rgb.convert("RGBA"))
    _save(root / "b/palette.png", rgb.convert("P"))
    i16 = (_photo(60, 40, 4)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    _save(root / "b/i16.png", Image.fromarray(i16))
    _save(root / "b/img.webp", rgb, quality=90)
    _save(root / "b/img.bmp", small)
    _save(root / "b/img.gif", small.convert("P"))
    jpeg = (root / BASELINE[0]).read_bytes()
    (root / "b/trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "b/garbage.jpg").write_bytes(np.random.default_rng(5).integers(0, 256, 3000, np.uint8).tobytes())
    (root / "b/empty.jpg").write_bytes(b"")
    return root


def _rel(folder: ImageFolderDataset, i: int) -> str:
    return Path(os.path.relpath(folder.paths[i], folder.root)).as_posix()


def _items(data: FileBytesDataset, names: list[str]) -> list[dict[str, object]]:
    index = {Path(os.path.relpath(p, data.root)).as_posix(): i for i, p in enumerate(data.paths)}
    return [data[index[name]] for name in names]


def _per_sample(path: str, in_chans: int) -> torch.Tensor:
    return pil_to_tensor(decode_image(path, MODES[in_chans]))


def _decode_quietly(
    items: list[dict[str, object]], data: FileBytesDataset, in_chans: int
) -> decode_mod.Decoded:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return BatchDecoder()(items, data, CPU, in_chans)


def test_file_bytes_dataset_returns_raw_bytes(root: Path, tmp_path: Path) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    for i in range(len(data)):
        item = data[i]
        assert item["data"].dtype == torch.uint8 and item["data"].dim() == 1
        assert bytes(item["data"].numpy()) == Path(data.paths[i]).read_bytes()
        assert (item["index"], item["label"]) == (i, data.labels[i])
    assert data[-1]["index"] == len(data) - 1
    with pytest.raises(IndexError):
        data[len(data)]
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=list)))
    assert [item["index"] for item in batch] == [0, 1, 2, 3]
    # A file that vanished after the scan reads as no bytes.
    (tmp_path / "x.png").write_bytes((root / "b/rgb.png").read_bytes())
    gone = FileBytesDataset(ImageFolderDataset(tmp_path))
    (tmp_path / "x.png").unlink()
    assert gone[0]["data"].numel() == 0


@pytest.mark.parametrize("in_chans", [1, 3])
def test_batched_decode_matches_per_sample(root: Path, in_chans: int) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    names = JPEGS + OTHERS
    out = _decode_quietly(_items(data, names), data, in_chans)
    assert out.skipped == 0 and len(out.images) == len(names)
    assert out.cpu_fallbacks == len(OTHERS)
    for name, img in zip(names, out.images, strict=True):
        ref = _per_sample(str(root / name), in_chans)
        assert img.dtype == torch.uint8 and img.device == CPU, name
        assert img.shape == ref.shape == (in_chans, *ref.shape[1:]), name
        diff = (img.int() - ref.int()).abs()
        if in_chans == 1 and name in COLOUR_JPEGS and name != "a/cmyk.jpg":
            assert diff.float().mean() < 0.1 and (diff <= 1).float().mean() >= 0.999, name
        else:
            assert torch.equal(img, ref), name
    # (d) one batch, several sizes
    assert len({tuple(img.shape) for img in out.images}) >= 6


@pytest.mark.parametrize("in_chans", [1, 3])
def test_bad_files_are_skipped_like_image_folder(root: Path, in_chans: int) -> None:
    folder = ImageFolderDataset(root, mode=MODES[in_chans])
    data = FileBytesDataset(folder)
    bad = {i for i in range(len(folder)) if _rel(folder, i) in BAD}
    assert len(bad) == len(BAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = [folder[i] for i in range(len(folder))]
        # The whole folder as one batch, and item by item with a fresh decoder each.
        whole = BatchDecoder()([data[i] for i in range(len(data))], data, CPU, in_chans)
        single = [BatchDecoder()([data[i]], data, CPU, in_chans) for i in range(len(data))]
    assert whole.indices.tolist() == [e["index"] for e in expected]
    assert whole.labels.tolist() == [e["label"] for e in expected]
    assert whole.skipped == sum(e["skipped"] for e in expected) > 0
    assert [(s.indices.item(), s.skipped) for s in single] == [(e["index"], e["skipped"]) for e in expected]
    # Replacements count as fallbacks when PIL decodes them.
    non_jpeg = sum(_rel(folder, e["index"]) in OTHERS for e in expected)
    assert whole.cpu_fallbacks == non_jpeg
    for img, e in zip(whole.images, expected, strict=True):
        if in_chans == 3 or _rel(folder, e["index"]) not in COLOUR_JPEGS:
            assert torch.equal(img, pil_to_tensor(e["image"]))


def test_cpu_fallbacks_count_exactly_the_non_jpegs(root: Path) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    for names in ([*BASELINE], ["b/rgb.png", BASELINE[0], "b/img.gif"], [*OTHERS, "a/cmyk.jpg"]):
        out = _decode_quietly(_items(data, names), data, 3)
        assert out.cpu_fallbacks == sum(name in OTHERS for name in names)


def test_truncated_jpeg_is_bad_on_both_paths(root: Path, tmp_path: Path) -> None:
    jpeg = (root / BASELINE[0]).read_bytes()
    # torchvision's libjpeg source manager raises when data runs out (instead of libjpeg's
    # "Premature end of JPEG file" warning and a grey fill); the batched path does not rely on it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match="truncated"):
            decode_jpeg(torch.frombuffer(bytearray(jpeg[:-2]), dtype=torch.uint8))
    cases = {"half.jpg": jpeg[: len(jpeg) // 2], "no_eoi.jpg": jpeg[:-2], "z_good.jpg": jpeg}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    folder = ImageFolderDataset(tmp_path)
    data = FileBytesDataset(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = [folder[i] for i in range(len(folder))]
        out = BatchDecoder()([data[i] for i in range(len(data))], data, CPU, 3)
    assert [e["index"] for e in expected] == out.indices.tolist() == [2, 2, 2]
    assert [e["skipped"] for e in expected] == [2, 1, 0] and out.skipped == 3


def test_only_complete_rgb_or_grey_jpegs_go_to_the_device(root: Path) -> None:
    cuda = torch.device("cuda")  # only compared, never used
    data = {name: torch.from_numpy(np.fromfile(root / name, dtype=np.uint8)) for name in JPEGS + OTHERS + BAD}
    assert _jpeg_plan(data[BASELINE[0]], cuda) == (1, cuda)
    assert _jpeg_plan(data["a/progressive.jpg"], cuda) == (1, cuda)
    assert _jpeg_plan(data["a/exif6.jpg"], cuda) == (6, cuda)
    assert _jpeg_plan(data["a/cmyk.jpg"], cuda) == (1, CPU)
    jpeg = data[BASELINE[0]]
    for rejected in [*OTHERS, *BAD]:
        assert _jpeg_plan(data[rejected], cuda) is None, rejected
    assert _jpeg_plan(jpeg[:-2], cuda) is None


def test_truncated_jpeg_is_bad_even_if_the_device_decoder_is_lenient(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG may fill in missing data instead of failing; PIL must still decide on truncated files."""

    def lenient(inp: torch.Tensor | list[torch.Tensor], **kw: object) -> object:
        grey = [
            torch.full((3, 8, 8), 128, dtype=torch.uint8) for _ in (inp if isinstance(inp, list) else [inp])
        ]
        return grey if isinstance(inp, list) else grey[0]

    monkeypatch.setattr(decode_mod, "decode_jpeg", lenient)
    folder = ImageFolderDataset(root)
    data = FileBytesDataset(folder)
    index = folder.paths.index(str(root / "b/trunc.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = BatchDecoder()([data[index]], data, CPU, 3)
        expected = folder[index]
    assert out.skipped == expected["skipped"] == 1
    assert out.indices.item() == expected["index"] != index


def test_device_refusal_is_retried_with_pil(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    items = _items(data, [*BASELINE, "b/rgb.png"])
    refused = items[1]["data"]
    real = decode_jpeg

    def picky(inp: torch.Tensor | list[torch.Tensor], **kw: object) -> object:
        if any(t is refused for t in (inp if isinstance(inp, list) else [inp])):
            raise RuntimeError("nvjpeg says no")
        return real(inp, **kw)

    monkeypatch.setattr(decode_mod, "decode_jpeg", picky)
    out = _decode_quietly(items, data, 3)
    assert out.skipped == 0 and out.cpu_fallbacks == 2
    for name, img in zip([*BASELINE, "b/rgb.png"], out.images, strict=True):
        assert torch.equal(img, _per_sample(str(root / name), 3))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_both_paths(tmp_path: Path, orientation: int) -> None:
    plain = Image.fromarray(_photo(120, 80, 7))
    _save(tmp_path / "x.jpg", plain, quality=95, exif=_exif(orientation))
    folder = ImageFolderDataset(tmp_path)
    data = FileBytesDataset(folder)
    out = BatchDecoder()([data[0]], data, CPU, 3)
    ref = pil_to_tensor(folder[0]["image"])
    assert torch.equal(out.images[0], ref)
    assert ref.shape[1:] == ((120, 80) if orientation >= 5 else (80, 120))
    if orientation == 3:
        unrotated = pil_to_tensor(Image.open(tmp_path / "x.jpg").convert("RGB"))
        assert torch.equal(ref, unrotated.flip(-2, -1))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_bombs_are_refused_on_both_paths(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 500x375 falls in PIL's warning zone (MAX < pixels <= 2 MAX), which both paths refuse; 64x48 does not.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500 * 375 - 1)
    folder = ImageFolderDataset(root)
    data = FileBytesDataset(folder)
    index = folder.paths.index(str(root / BASELINE[0]))
    with pytest.warns(RuntimeWarning, match="DecompressionBomb"):
        out = BatchDecoder()([data[index]], data, CPU, 3)
    assert folder[index]["skipped"] == out.skipped == 1
    assert folder[index]["index"] == out.indices.item()


def test_bad_path_warned_once_with_image_folder_message(root: Path) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    items = _items(data, ["b/garbage.jpg"])
    decode_mod._warned.discard(str(root / "b/garbage.jpg"))
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image '.*garbage\.jpg' \(") as record:
        BatchDecoder()(items, data, CPU, 3)
    assert len([w for w in record if "garbage" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        BatchDecoder()(items, data, CPU, 3)


def test_rejects_bad_in_chans_and_all_bad_folders(root: Path, tmp_path: Path) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    with pytest.raises(ValueError, match="in_chans"):
        BatchDecoder()([data[0]], data, CPU, 4)
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"nope")
    empty = FileBytesDataset(ImageFolderDataset(tmp_path))
    with pytest.raises(RuntimeError, match="all 2 image files"):
        _decode_quietly([empty[0]], empty, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("in_chans", [1, 3])
def test_cuda_decode_matches_cpu(root: Path, in_chans: int) -> None:
    data = FileBytesDataset(ImageFolderDataset(root))
    items = _items(data, [*BASELINE, "a/gray.jpg", "a/exif6.jpg", "a/cmyk.jpg"])
    cpu = _decode_quietly(items, data, in_chans)
    cuda = BatchDecoder()(items, data, torch.device("cuda"), in_chans)
    assert cuda.cpu_fallbacks == cpu.cpu_fallbacks == 0
    for a, b in zip(cpu.images, cuda.images, strict=True):
        assert b.device.type == "cuda" and a.shape == b.shape
        # nvJPEG's IDCT and upsampling may differ from libjpeg's by a few grey levels.
        diff = (a.int() - b.cpu().int()).abs()
        assert diff.float().mean() < 1 and (diff <= 2).float().mean() >= 0.99


def test_pil_decode_of_bytes_is_the_per_sample_decode(root: Path) -> None:
    for name in ["b/i16.png", "b/rgba.png", "a/exif6.jpg"]:
        from_bytes = decode_image(io.BytesIO((root / name).read_bytes()), "RGB")
        assert torch.equal(pil_to_tensor(from_bytes), _per_sample(str(root / name), 3))
