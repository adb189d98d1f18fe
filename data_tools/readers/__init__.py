"""Input readers, one module per layout, behind one interface.

Each reader module exposes

- ``plan(path, opts) -> list[dict]``: split one input into *units*, the pieces a worker
  converts on its own and the grain of resumption (a tar, a folder, a run of Parquet row
  groups, a range of TSV/JSON rows). Units are small picklable dicts; their order is
  deterministic, so every array task computes the same list.
- ``read(unit, opts) -> Iterator[RawPair | Reject]``: the rows of one unit, streamed.

:func:`detect_format` picks the reader from the path when ``--input-format`` is not given.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional

from data_tools.records import RawPair, Reject

#: format name -> module (relative to this package)
FORMATS = {
    "webdataset": "webdataset",   # img2dataset webdataset output: {shard}.tar of key.jpg/.txt/.json
    "files": "files",             # img2dataset files output: {shard}/{key}.jpg|.txt|.json
    "parquet": "table",           # Parquet with image bytes (binary column or {bytes, path} struct)
    "arrow": "table",             # Arrow IPC files (e.g. Hugging Face datasets cache files)
    "tsv": "delimited",           # caption/path columns, tab separated (CC3M/CC12M style)
    "csv": "delimited",
    "json": "json_list",          # ALBEF/COCO-style annotation list, or COCO captions format
}

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class InputError(ValueError):
    """An input that does not exist or cannot be read at all; the message names the path."""


@dataclass
class ReaderOptions:
    source: Optional[str] = None         # source name stored with each pair (default: input name)
    image_root: Optional[str] = None     # base folder of relative image paths (TSV/CSV/JSON/struct)
    caption_col: Optional[str] = None    # name or 0-based index
    image_col: Optional[str] = None      # name or 0-based index
    key_col: Optional[str] = None
    header: Optional[bool] = None        # TSV/CSV: first row names the columns (None: auto)
    rows_per_unit: int = 10_000          # TSV/JSON/Parquet: rows per unit of work
    batch_rows: int = 256                # Parquet/Arrow: rows per record batch read


def reader_module(fmt: str):
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    return importlib.import_module(f"data_tools.readers.{FORMATS[fmt]}")


def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"input path does not exist: {path}")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        by_ext = {".tar": "webdataset", ".tsv": "tsv", ".txt": "tsv", ".csv": "csv",
                  ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
        if ext in by_ext:
            return by_ext[ext]
        raise InputError(f"cannot tell the format of {path} from its extension; "
                         f"pass --input-format ({', '.join(sorted(FORMATS))})")
    if glob.glob(os.path.join(path, "*.tar")):
        return "webdataset"
    if _is_img2dataset_files_output(path):  # before .parquet: its side-cars are Parquet files
        return "files"
    if glob.glob(os.path.join(path, "*.parquet")):
        return "parquet"
    if glob.glob(os.path.join(path, "*.arrow")):
        return "arrow"
    if glob.glob(os.path.join(path, "*", "*.txt")) or glob.glob(os.path.join(path, "*.txt")):
        return "files"
    raise InputError(f"cannot tell the input format of folder {path} (no .tar, .parquet, "
                     f".arrow or key.txt files); pass --input-format")


def _is_img2dataset_files_output(path: str) -> bool:
    """img2dataset's ``files`` layout: numbered shard folders (``00000/``) of ``key.jpg`` /
    ``key.txt`` / ``key.json``, with the side-cars ``00000.parquet`` and ``00000_stats.json``
    (metadata of every input row, no images) beside them."""
    for entry in os.scandir(path):
        if entry.is_dir() and entry.name.isdigit():
            with os.scandir(entry.path) as files:
                for f in files:  # the first sample file decides: no need to list 10k files
                    ext = os.path.splitext(f.name)[1].lower()
                    if ext == ".txt" or ext in IMAGE_EXTS:
                        return True
    return False


def plan_input(path: str, fmt: Optional[str], opts: ReaderOptions) -> list[dict]:
    fmt = fmt or detect_format(path)
    if not os.path.exists(path):
        raise InputError(f"input path does not exist: {path}")
    units = reader_module(fmt).plan(path, opts)
    for u in units:
        u["format"] = fmt
    return units


def read_unit(unit: dict, opts: ReaderOptions) -> Iterator[RawPair | Reject]:
    return reader_module(unit["format"]).read(unit, opts)


#: ``scheme://``: an image given as a URL (CC3M/CC12M/SBU as distributed), never a local file
URL_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def looks_like_url(value: str) -> bool:
    return bool(URL_PREFIX.match(value))


def resolve_image_path(value: str, root: Optional[str]) -> str:
    """A relative path joined to ``root``; absolute paths and URLs unchanged (a URL then
    fails to open as ``missing_file`` with the URL itself in the detail)."""
    if os.path.isabs(value) or not root or looks_like_url(value):
        return value
    return os.path.join(root, value)
