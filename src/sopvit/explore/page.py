"""One self-contained HTML page of image rows: what ``search``, ``dedup`` and ``prototypes assign`` show.

The page is a single file, every image inlined as a small data-URI thumbnail, so it can be mailed,
archived or opened on a laptop far from the data (and from the tar shards the images may live in). An
image that cannot be read becomes a visible placeholder tile that says why: one moved file must not cost
the whole page. Text is escaped, and the file appears whole or not at all (temporary name, then rename).
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from sopvit.data.shard_index import ShardIndex, load_index

THUMB = 160  # longest side, px: about eight tiles per row on a laptop screen
_SHARD_PATH = re.compile(r"^(?P<shard>.+\.tar):(?P<key>[^:]+)$")

_STYLE = string.Template("""
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1em; margin: 1.2em 0 .4em; word-break: break-all; }
.intro { color: #555; max-width: 60em; white-space: pre-wrap; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: ${figure}px; }
figure img { display: block; width: ${size}px; height: ${size}px; object-fit: contain; background: #f3f3f3;
  border: 1px solid #ccc; image-rendering: pixelated; }
.missing { width: ${inner}px; height: ${inner}px; padding: 4px; border: 2px dashed #c33; color: #c33;
  font-size: .75em; overflow: hidden; word-break: break-all; }
figcaption { font-size: .75em; color: #333; word-break: break-all; }
""")


class OutputExistsError(ValueError):
    """An output is already there and ``overwrite`` was not asked for."""


@dataclass
class Tile:
    path: str  # an image file, or SHARD.tar:KEY for an image inside a tar shard
    caption: str


@dataclass
class GalleryRow:
    title: str
    tiles: list[Tile]


class _Images:
    """Thumbnails as data URIs, each image read once however often the page shows it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._uris: dict[str, tuple[bool, str]] = {}  # path: (ok, data URI or reason)
        self._indexes: dict[str, ShardIndex] = {}

    def open(self, path: str) -> str | io.BytesIO:
        """What PIL opens for ``path``: the file name itself, or the bytes of a shard's member."""
        match = _SHARD_PATH.match(path)
        if match is None or os.path.exists(path):
            return path
        shard, key = match["shard"], match["key"]
        if shard not in self._indexes:
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"shard {shard} does not exist")
            self._indexes[shard] = load_index(shard)
        index = self._indexes[shard]
        try:
            at = index.keys.index(key)
        except ValueError:
            raise FileNotFoundError(f"shard {shard} holds no key {key!r}") from None
        with open(shard, "rb") as f:
            f.seek(index.offsets[at])
            return io.BytesIO(f.read(index.sizes[at]))

    def uri(self, path: str) -> str | None:
        """A data URI of ``path``'s thumbnail, or None when it cannot be made (``reason`` says why)."""
        if path not in self._uris:
            try:
                self._uris[path] = (True, self._thumbnail(path))
            # As for the data sets: any failure to read or decode means "cannot show", never a broken page.
            except Exception as err:
                self._uris[path] = (False, f"{type(err).__name__}: {err}".splitlines()[0])
        ok, text = self._uris[path]
        return text if ok else None

    def reason(self, path: str) -> str:
        return self._uris[path][1]

    def _thumbnail(self, path: str) -> str:
        with Image.open(self.open(path)) as file:
            file.draft("RGB", (self.size, self.size))  # a JPEG decodes at 1/2..1/8 scale: much faster
            file.load()
            img = ImageOps.exif_transpose(file)
        img.thumbnail((self.size, self.size))
        alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        img = img.convert("RGBA" if alpha else "RGB")
        buf = io.BytesIO()
        # JPEG is several times smaller for photos; PNG only where transparency must survive.
        img.save(buf, format="PNG" if alpha else "JPEG", quality=85)
        kind = "png" if alpha else "jpeg"
        return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _tile(images: _Images, tile: Tile) -> str:
    caption = f"<figcaption>{html.escape(tile.caption)}</figcaption>"
    uri = images.uri(tile.path)
    if uri is None:
        reason = html.escape(images.reason(tile.path))
        body = f'<div class="missing">cannot show {html.escape(tile.path)}<br>{reason}</div>'
    else:
        body = f'<img src="{uri}" alt="{html.escape(tile.path)}" title="{html.escape(tile.path)}">'
    return f"<figure>{body}{caption}</figure>"


def write_gallery_page(
    out: Path,
    title: str,
    intro: str,
    rows: list[GalleryRow],
    *,
    overwrite: bool = False,
    thumb: int = THUMB,
) -> Path:
    """Write ``rows`` of image tiles as one self-contained HTML file at ``out``; returns ``out``.

    Refuses an existing ``out`` unless ``overwrite``. ``thumb`` is the thumbnails' longest side in px.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: pass --overwrite to replace it")
    images = _Images(thumb)
    style = _STYLE.substitute(size=thumb, figure=thumb + 8, inner=thumb - 10)
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="intro">{html.escape(intro)}</p>']
    for row in rows:
        tiles = "".join(_tile(images, t) for t in row.tiles)
        body.append(f'<section><h2>{html.escape(row.title)}</h2><div class="row">{tiles}</div></section>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
