"""``--exclude``: content hashes of evaluation images, so pretraining never sees them.

Accepts our ``manifest.parquet`` files (their ``sha1`` column), dataset folders holding
one, and annotation JSON files (ALBEF retrieval lists ``[{"image": path, ...}]`` or COCO
captions files), whose image files are hashed; relative paths are taken from
``image_root`` or the JSON's folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import pyarrow.parquet as pq

from data_tools.readers import InputError, resolve_image_path


def load_exclude_hashes(paths: Iterable[str], image_root: Optional[str] = None) -> frozenset:
    hashes: set[str] = set()
    for path in paths:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.parquet")):
            path = os.path.join(path, "manifest.parquet")
        if not os.path.exists(path):
            raise InputError(f"--exclude path does not exist: {path}")
        if path.endswith(".parquet"):
            hashes.update(pq.read_table(path, columns=["sha1"]).column("sha1").to_pylist())
        elif path.endswith(".json"):
            hashes.update(_hash_annotation_images(path, image_root))
        else:
            raise InputError(f"--exclude takes manifest.parquet files, dataset folders or "
                             f"annotation .json files, not {path}")
    return frozenset(hashes)


def _hash_annotation_images(path: str, image_root: Optional[str]) -> set[str]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "images" in data:
        images = [im["file_name"] for im in data["images"]]
    elif isinstance(data, list):
        images = [e["image"] for e in data if isinstance(e, dict) and "image" in e]
    else:
        raise InputError(f"{path}: not an annotation list or COCO captions file")
    root = image_root or os.path.dirname(os.path.abspath(path))
    out = set()
    for rel in dict.fromkeys(images):
        p = resolve_image_path(rel, root)
        try:
            with open(p, "rb") as f:
                out.add(hashlib.sha1(f.read()).hexdigest())
        except OSError as e:
            raise InputError(f"{path}: cannot read image {p} to exclude it: {e}") from e
    return out
