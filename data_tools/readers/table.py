"""Parquet and Arrow IPC tables holding image bytes: a binary column (img2dataset's
parquet output has ``jpg``) or a ``{bytes, path}`` struct (how Hugging Face datasets store
an Image feature), plus a caption column. Read in record batches of ``batch_rows`` rows,
only the needed columns, never a whole table.

Parquet units are runs of row groups holding at least ``rows_per_unit`` rows; an Arrow
file is one unit. img2dataset rows whose download failed (null image, ``status`` not
``success``) are counted as ``download_failed``.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.readers import InputError, ReaderOptions, resolve_image_path
from data_tools.records import RawPair, Reject

IMAGE_NAMES = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
CAPTION_NAMES = ("caption", "text", "txt", "sentence")


def _files(path: str, ext: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, f"*{ext}")))
    if not files:
        raise InputError(f"no {ext} files in {path}")
    return files


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def _pick(schema: pa.Schema, given: Optional[str], names, what: str, path: str, check=None) -> Optional[str]:
    if given is not None:
        if given.isdigit():
            given = schema.names[int(given)]
        if given not in schema.names:
            raise InputError(f"{path}: no column {given!r} (columns: {schema.names})")
        return given
    for n in names:
        if n in schema.names and (check is None or check(schema.field(n).type)):
            return n
    if what == "image":  # any binary / {bytes, path} column will do
        for f in schema:
            if _is_image_type(f.type):
                return f.name
    if what in ("key", "status"):
        return None
    raise InputError(f"{path}: cannot find the {what} column among {schema.names}; "
                     f"give --{what}-col")


def _open_arrow(path: str):
    try:
        return pa.ipc.open_file(path)
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(path)


def _schema(path: str, fmt: str) -> pa.Schema:
    try:
        if fmt == "parquet":
            return pq.ParquetFile(path).schema_arrow
        with pa.memory_map(path) as src:
            return _open_arrow(src).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}") from e


def plan(path: str, opts: ReaderOptions) -> list[dict]:
    fmt = "arrow" if (path.endswith(".arrow") or (os.path.isdir(path) and not glob.glob(
        os.path.join(path, "*.parquet")))) else "parquet"
    units = []
    for f in _files(path, "." + fmt):
        schema = _schema(f, fmt)
        cols = {"image_col": _pick(schema, opts.image_col, IMAGE_NAMES, "image", f, _is_image_type),
                "caption_col": _pick(schema, opts.caption_col, CAPTION_NAMES, "caption", f),
                "key_col": _pick(schema, opts.key_col, ("key",), "key", f),
                "status_col": "status" if "status" in schema.names else None}
        stem = os.path.splitext(os.path.basename(f))[0]
        if fmt == "arrow":
            units.append({"path": f, "kind": "arrow", "row_groups": None, "first_row": 0, "stem": stem, **cols})
            continue
        meta = pq.ParquetFile(f).metadata
        groups, rows, first = [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= opts.rows_per_unit or g == meta.num_row_groups - 1:
                units.append({"path": f, "kind": "parquet", "row_groups": groups, "first_row": first,
                              "stem": stem, **cols})
                first += rows
                groups, rows = [], 0
    return units


def _batches(unit: dict, columns: list[str], batch_rows: int):
    if unit["kind"] == "parquet":
        yield from pq.ParquetFile(unit["path"]).iter_batches(
            batch_size=batch_rows, row_groups=unit["row_groups"], columns=columns)
        return
    with pa.memory_map(unit["path"]) as src:
        reader = _open_arrow(src)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
            if isinstance(reader, pa.ipc.RecordBatchFileReader) else reader
        for b in batches:
            yield b.select(columns)


def read(unit: dict, opts: ReaderOptions) -> Iterator[RawPair | Reject]:
    source = unit["source"]
    root = opts.image_root or os.path.dirname(os.path.abspath(unit["path"]))
    cols = [c for c in (unit["image_col"], unit["caption_col"], unit["key_col"], unit["status_col"]) if c]
    cols = list(dict.fromkeys(cols))
    row = unit["first_row"]
    for batch in _batches(unit, cols, opts.batch_rows):
        data = {c: batch.column(c).to_pylist() for c in cols}
        for i in range(batch.num_rows):
            key = data[unit["key_col"]][i] if unit["key_col"] else None
            key = str(key) if key is not None else f"{unit['stem']}/{row:09d}"
            row += 1
            image = data[unit["image_col"]][i]
            image_path = None
            if isinstance(image, dict):  # {bytes, path}
                if image.get("bytes") is None and image.get("path"):
                    image_path = resolve_image_path(image["path"], root)
                image = image.get("bytes")
            caption = data[unit["caption_col"]][i]
            if image is None and image_path is None:
                status = data[unit["status_col"]][i] if unit["status_col"] else None
                if status is not None and status != "success":
                    yield Reject("download_failed", f"{source}/{key}", str(status), source)
                else:
                    yield Reject("missing_file", f"{source}/{key}", "null image", source)
                continue
            if caption is not None and not isinstance(caption, (str, bytes)):
                yield Reject("malformed_row", f"{source}/{key}", f"caption of type {type(caption).__name__}", source)
                continue
            yield RawPair(key=key, caption=caption, image=image, image_path=image_path, source=source)
