"""img2dataset's webdataset output: ``{shard:05d}.tar`` holding ``key.jpg``, ``key.txt``
(the caption) and ``key.json`` (metadata, with the caption too). One unit per tar.

The ``{shard}.parquet`` and ``{shard}_stats.json`` files beside the tars describe every
input row, failed downloads included; they hold no images and are not read here (for a
folder written by ``albef-data download``, its ``rejects.jsonl`` lists the failed URLs and
the merge folds them into the converted dataset's).
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Iterator

from data_tools.readers import IMAGE_EXTS, InputError, ReaderOptions
from data_tools.records import RawPair, Reject


def plan(path: str, opts: ReaderOptions) -> list[dict]:
    tars = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.tar")))
    if not tars:
        raise InputError(f"no .tar files in {path}")
    return [{"path": t} for t in tars]


def read(unit: dict, opts: ReaderOptions) -> Iterator[RawPair | Reject]:
    source = unit["source"]
    try:
        tar = tarfile.open(unit["path"], mode="r|*")  # streamed: members in file order
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"cannot read tar {unit['path']}: {e}") from e
    current, parts = None, {}
    try:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            key, _, ext = name.partition(".")
            if key != current:
                if current is not None:
                    yield _pair(current, parts, source, unit["path"])
                current, parts = key, {}
            f = tar.extractfile(member)
            parts["." + ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated tar: keep what was whole
        yield Reject("malformed_row", f"{source}/{current}", f"tar ends early: {e}", source)
        current = None
    finally:
        tar.close()
    if current is not None:
        yield _pair(current, parts, source, unit["path"])


def _pair(key: str, parts: dict, source: str, tar_path: str) -> RawPair | Reject:
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:  # the image is what is missing: named as the files reader names it
        return Reject("missing_file", f"{source}/{key}", f"sample {key} in {tar_path} has no image member",
                      source)
    meta = _meta(parts.get(".json"))
    caption = parts.get(".txt")
    if caption is None:
        caption = meta.get("caption")
    # albef-data download saves each URL's list line in its JSON: a reject then names it
    line = meta.get("line")
    return RawPair(key=key, caption=caption, image=image, source=source,
                   line=line if isinstance(line, int) else None, url=meta.get("url"))


def _meta(data: bytes | None) -> dict:
    """img2dataset's ``key.json`` (url, caption, status, ...), or {} when absent or unreadable."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
