"""What every reader yields and how one raw pair is checked before it is written.

Readers know file layouts; they yield :class:`RawPair` (image bytes or a path to read,
caption as str or undecoded bytes) or :class:`Reject` (a row they could not even parse).
:func:`check_pair` turns a RawPair into a :class:`Pair` ready for the shard writer, or a
Reject naming one of :data:`REASONS`. Nothing here imports torch or streaming.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field

from PIL import Image

from data_tools import rejects

#: Why a row was not written. Every reject carries exactly one of these.
REASONS = (
    "missing_file",      # the image path does not exist, or an img2dataset sample has no image
    "empty_image",       # zero bytes
    "corrupt_image",     # PIL cannot decode it, or it is truncated
    "bad_caption",       # empty, whitespace only, or not valid UTF-8
    "malformed_row",     # the row itself cannot be parsed (wrong field count, bad JSON entry, cut tar)
    "download_failed",   # img2dataset recorded a failed download (no image stored)
    "excluded",          # the image is in an evaluation set given with --exclude
)

#: JPEG quality when --max-side forces a re-encode (high: the loader crops and resizes again).
RESIZE_JPEG_QUALITY = 95


@dataclass
class RawPair:
    """One candidate image-caption pair, as a reader found it."""
    key: str                                  # unique within its source
    caption: str | bytes | None
    image: bytes | None = None                # encoded image bytes, or
    image_path: str | None = None             # a local file to read them from
    source: str = ""
    line: int | None = None                   # the URL list's line (a sample of albef-data download)
    url: str | None = None                    # the URL it was downloaded from


@dataclass
class Reject:
    reason: str
    key: str
    detail: str = ""
    source: str = ""
    line: int | None = None                   # as the RawPair had them: a rejects file that
    url: str | None = None                    # follows albef-data download names the list's line
    caption: str | None = None

    def to_dict(self) -> dict:
        """A row of the rejects file (data_tools/rejects.py): line, URL and caption when known."""
        return rejects.record(self.reason, self.detail, "convert", self.line, self.url, self.caption,
                              source=self.source, key=self.key)


@dataclass
class Pair:
    """A checked pair, exactly what goes into a shard and the manifest."""
    key: str             # "<source>/<reader key>"
    source: str
    caption: str
    image: bytes         # stored bytes (the original file unless --max-side resized it)
    width: int
    height: int
    sha1: str            # of the ORIGINAL image bytes (what --exclude and duplicates compare)
    image_id: int = field(init=False)

    def __post_init__(self):
        self.image_id = image_id_from_sha1(self.sha1)


def image_id_from_sha1(sha1_hex: str) -> int:
    """A non-negative int64 from the content hash: equal images share it across sources."""
    return int(sha1_hex[:15], 16)  # 60 bits: positive in int64, collisions ~ n^2 / 2^61


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def decode_caption(caption: str | bytes | None) -> str | None:
    """UTF-8 text with surrounding whitespace removed, or None when empty/undecodable."""
    if caption is None:
        return None
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None
    caption = caption.strip()
    if not caption:
        return None
    return caption


def check_pair(raw: RawPair, max_side: int | None = None,
               exclude: frozenset | None = None) -> Pair | Reject:
    """Read, hash and fully decode the image; check the caption. Never raises on bad data."""
    def reject(reason, detail=""):
        caption = None if raw.line is None and raw.url is None else rejects.shown_text(raw.caption)
        return Reject(reason, f"{raw.source}/{raw.key}", detail, raw.source, raw.line, raw.url, caption)

    data = raw.image
    if data is None and raw.image_path is not None:
        try:
            with open(raw.image_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return reject("missing_file", raw.image_path)
        except OSError as e:
            return reject("missing_file", f"{raw.image_path}: {e}")
    if data is None:
        return reject("missing_file", "no image given")
    if len(data) == 0:
        return reject("empty_image", raw.image_path or "")
    caption = decode_caption(raw.caption)
    if caption is None:
        return reject("bad_caption", repr(raw.caption)[:200])
    digest = sha1_hex(data)
    if exclude and digest in exclude:
        return reject("excluded", digest)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: verify() misses truncated files
            width, height = im.size
            if max_side and max(width, height) > max_side:
                data, width, height = _shrink(im, max_side)
    except Exception as e:  # PIL raises many types on bad data
        return reject("corrupt_image", image_error(e))
    return Pair(key=f"{raw.source}/{raw.key}", source=raw.source, caption=caption, image=data,
                width=width, height=height, sha1=digest)


#: ``<_io.BytesIO object at 0x7f...>``: the stream PIL names in its messages, of no use to a reader
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def image_error(e: Exception) -> str:
    """What PIL's exception says about the bytes, in plain words: "not an image (cannot
    identify image file)", "truncated image (...)", else "cannot decode it (...)"."""
    from PIL import UnidentifiedImageError

    message = _OBJECT_REPR.sub("", str(e)).strip() or type(e).__name__
    if isinstance(e, UnidentifiedImageError):
        return f"not an image ({message})"
    if "truncated" in message.lower():
        return f"truncated image ({message})"[:200]
    return f"cannot decode it ({type(e).__name__}: {message})"[:200]


def _shrink(im: Image.Image, max_side: int) -> tuple[bytes, int, int]:
    scale = max_side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=RESIZE_JPEG_QUALITY)
    return buf.getvalue(), size[0], size[1]


def source_name(path: str) -> str:
    """Default source name of an input: its file or folder name without extension."""
    base = os.path.basename(os.path.normpath(path))
    for ext in (".tar", ".tsv", ".csv", ".json", ".jsonl", ".parquet", ".arrow"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base
