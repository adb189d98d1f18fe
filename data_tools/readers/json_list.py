"""ALBEF/COCO-style annotation JSON: a list of ``{"image": path, "caption": str or [str]}``
(one pair per caption), or the COCO captions file ``{"images": [...], "annotations": [...]}``.
Relative image paths are joined to ``--image-root`` (default: the JSON's folder).

The whole file is parsed once per worker process (annotation files are tens of MB at most);
units are ranges of ``rows_per_unit`` entries.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Iterator

from data_tools.readers import InputError, ReaderOptions, resolve_image_path
from data_tools.records import RawPair, Reject


@functools.lru_cache(maxsize=2)
def _entries(path: str) -> list:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
        files = {im["id"]: im["file_name"] for im in data["images"]}
        return [{"image": files.get(a.get("image_id")), "caption": a.get("caption"),
                 "image_id": a.get("image_id"), "key": str(a.get("id", i))}
                for i, a in enumerate(data["annotations"])]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{image, caption}} entries "
                         f"or a COCO captions file")
    return data


def plan(path: str, opts: ReaderOptions) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"JSON input must be a file: {path}")
    n = len(_entries(path))
    step = opts.rows_per_unit
    return [{"path": path, "start": s, "stop": min(s + step, n)} for s in range(0, n, step)]


def read(unit: dict, opts: ReaderOptions) -> Iterator[RawPair | Reject]:
    source, path = unit["source"], unit["path"]
    root = opts.image_root or os.path.dirname(os.path.abspath(path))
    entries = _entries(path)
    for i in range(unit["start"], unit["stop"]):
        e = entries[i]
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "caption" not in e:
            yield Reject("malformed_row", f"{source}/{i}", f"entry {i}: {str(e)[:120]}", source)
            continue
        image_path = resolve_image_path(e["image"], root)
        base_key = str(e.get("key", i))
        captions = e["caption"]
        if isinstance(captions, list):
            if not captions:  # no pair to yield, but the entry must still be counted
                yield Reject("bad_caption", f"{source}/{base_key}", f"entry {i}: empty caption list", source)
            for j, c in enumerate(captions):
                yield RawPair(key=f"{base_key}_{j}", caption=c if isinstance(c, str) else None,
                              image_path=image_path, source=source)
        else:
            yield RawPair(key=base_key, caption=captions if isinstance(captions, str) else None,
                          image_path=image_path, source=source)
