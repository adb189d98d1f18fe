"""img2dataset's files output: ``{shard}/{key}.jpg|.txt|.json`` folders, one unit each
(or the folder itself when the keys lie directly in it)."""
from __future__ import annotations

import json
import os
from typing import Iterator

from data_tools.readers import IMAGE_EXTS, InputError, ReaderOptions
from data_tools.records import RawPair, Reject

#: files that make a key a sample even without its image (then a ``missing_file``)
SAMPLE_EXTS = frozenset({".txt", ".json"})
#: img2dataset's per-shard statistics file, ``{shard}_stats.json``: no sample
SIDE_CAR_SUFFIX = "_stats"


def plan(path: str, opts: ReaderOptions) -> list[dict]:
    if not os.path.isdir(path):
        raise InputError(f"files input must be a folder: {path}")
    subdirs = sorted(e.path for e in os.scandir(path) if e.is_dir())
    units = [{"path": d} for d in subdirs]
    if any(n.endswith(".txt") for n in os.listdir(path)):
        units.insert(0, {"path": path})
    return units


def read(unit: dict, opts: ReaderOptions) -> Iterator[RawPair | Reject]:
    source, folder = unit["source"], unit["path"]
    by_key: dict[str, set] = {}
    for name in os.listdir(folder):
        key, dot, ext = name.partition(".")
        if dot:
            by_key.setdefault(key, set()).add("." + ext.lower())
    for key in sorted(by_key):
        exts = by_key[key]
        image_ext = next((e for e in IMAGE_EXTS if e in exts), None)
        if image_ext is None and (key.endswith(SIDE_CAR_SUFFIX) or not exts & SAMPLE_EXTS):
            continue  # img2dataset's {shard}_stats.json, or a file that is no part of a sample
        if image_ext is None:  # named as the webdataset reader names it
            yield Reject("missing_file", f"{source}/{key}",
                         f"sample {key} in {folder} has no image file", source)
            continue
        caption = None
        if ".txt" in exts:
            with open(os.path.join(folder, key + ".txt"), "rb") as f:
                caption = f.read()
        elif ".json" in exts:
            try:
                with open(os.path.join(folder, key + ".json"), "rb") as f:
                    caption = json.load(f).get("caption")
            except (ValueError, AttributeError):
                caption = None
        yield RawPair(key=key, caption=caption, image_path=os.path.join(folder, key + image_ext),
                      source=source)
