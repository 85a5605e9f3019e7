"""write_shards and `sopvit shards write`: layout, manifest, resuming an interrupted pack, refusals."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from sopvit.cli import main
from sopvit.data.image_folder import ImageFolderDataset
from sopvit.data.shard_writer import write_shards
from tests.data.shard_images import flat_folder, labelled_folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return labelled_folder(tmp_path_factory.mktemp("writer") / "images", per_class=6)


def _members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def _contents(out: Path) -> dict[str, bytes]:
    """Shards and manifest (the index files hold the shards' mtimes, so they are left out)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith(".idx.json")}


def test_layout_keys_labels_and_manifest(images: Path, tmp_path: Path) -> None:
    result = write_shards(images, tmp_path / "out", per_shard=5)
    folder = ImageFolderDataset(images)
    assert (result.images, result.shards, result.written, result.reused) == (19, 4, 4, 0)
    assert result.pattern == f"{tmp_path}/out/shard-{{000000..000003}}.tar"
    first = _members(tmp_path / "out" / "shard-000000.tar")
    assert first[:4] == ["000000000.jpg", "000000000.cls", "000000001.jpg", "000000001.cls"]
    assert len(first) == 10 and len(_members(tmp_path / "out" / "shard-000003.tar")) == 8
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        assert tar.extractfile("000000007.cls").read() == str(folder.labels[7]).encode()  # type: ignore[union-attr]
        stored = tar.extractfile(f"000000007{Path(folder.paths[7]).suffix}").read()  # type: ignore[union-attr]
    assert stored == Path(folder.paths[7]).read_bytes()  # not re-encoded
    manifest = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert (
        manifest["count"] == 19
        and manifest["per_shard"] == 5
        and manifest["classes"] == ["ant", "bee", "cat"]
    )
    assert manifest["pattern"] == "shard-{000000..000003}.tar"
    assert all((tmp_path / "out" / f"shard-{i:06d}.tar.idx.json").is_file() for i in range(4))


def test_a_folder_without_classes_gets_no_labels(tmp_path: Path) -> None:
    write_shards(flat_folder(tmp_path / "flat", n=5), tmp_path / "out", per_shard=10, prefix="train")
    assert _members(tmp_path / "out" / "train-000000.tar") == [f"{i:09d}.jpg" for i in range(5)]
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["classes"] == []


def test_an_interrupted_pack_is_finished_byte_for_byte(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(images, out, per_shard=4)
    clean = _contents(out)
    (out / "shard-000001.tar").unlink()  # never written
    (out / "shard-000002.tar").rename(out / ".shard-000002.tar.tmp")  # interrupted mid-write
    truncated = (out / "shard-000003.tar").read_bytes()[:3000]
    (out / "shard-000003.tar").write_bytes(truncated)  # damaged afterwards
    (out / "shard-000004.tar.idx.json").unlink()
    result = write_shards(images, out, per_shard=4)
    assert (result.written, result.reused) == (3, 2)
    assert _contents(out) == clean
    assert (out / "shard-000004.tar.idx.json").is_file()


def test_an_out_dir_of_another_pack_is_refused(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(images, out, per_shard=4)
    with pytest.raises(ValueError, match=r"holds shards of another pack \(.*images', per_shard=4;"):
        write_shards(images, out, per_shard=5)
    other = flat_folder(tmp_path / "other")
    with pytest.raises(ValueError, match="holds shards of another pack"):
        write_shards(other, out, per_shard=4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds shard-\*.tar shards without a shards.json"):
        write_shards(images, foreign)
    with pytest.raises(ValueError, match="per_shard must be >= 1"):
        write_shards(images, tmp_path / "x", per_shard=0)


def test_cli_writes_shards_and_reports_in_one_line(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shards", "write", str(images), str(tmp_path / "out"), "--per-shard", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "19 images" in out[0] and "2 shards" in out[0]
    assert f"data.path={tmp_path}/out/shard-{{000000..000001}}.tar" in out[0]
    assert main(["shards", "write", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sopvit: error: image folder not found: '{tmp_path}/missing'"]
