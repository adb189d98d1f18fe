"""TSV/CSV caption files pointing at local images (CC3M: ``caption<TAB>url``; CC12M:
``url<TAB>caption``; both without a header). Columns are chosen by name (with a header)
or by 0-based index; relative image paths are joined to ``--image-root``.

One record per physical line (quoted newlines are not supported). Units are runs of
``rows_per_unit`` lines found by one pass that records byte offsets, so a worker seeks
straight to its rows.

Every row must have the file's field count: the header's, or without a header the count
most of the first :data:`FIELD_COUNT_SAMPLE_ROWS` rows have. A raw tab inside a TSV
caption adds a field; taking the first fields anyway would keep a cut caption (image
column first) or read caption words as the image path (caption first), so such a row is
a ``malformed_row``.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from typing import Iterator, Optional

from data_tools.readers import InputError, ReaderOptions, resolve_image_path
from data_tools.records import RawPair, Reject

CAPTION_NAMES = ("caption", "text", "txt", "title")
IMAGE_NAMES = ("image", "filepath", "file", "path", "image_path", "url")

#: rows read to learn a header-less file's field count: enough that a few rows with a stray
#: tab cannot outvote the rest, few enough to cost nothing next to the offsets pass.
FIELD_COUNT_SAMPLE_ROWS = 1000


def _split(line: str, fmt: str) -> list[str]:
    if fmt == "tsv":
        return line.split("\t")
    return next(csv.reader([line]))


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")


def _columns(path: str, fmt: str, opts: ReaderOptions) -> tuple[int, int, Optional[int], bool]:
    """(caption index, image index, key index or None, has header)."""
    with open(path, "rb") as f:
        first = _split(_decode(f.readline()), fmt)
    names = [n.strip().lower() for n in first]

    def find(given, defaults, what):
        if given is not None and str(given).lstrip("-").isdigit():
            return int(given)
        wanted = [str(given).lower()] if given is not None else list(defaults)
        for w in wanted:
            if w in names:
                return names.index(w)
        if given is None and what == "key":
            return None
        raise InputError(f"{path}: no {what} column named {' or '.join(wanted)} in the first "
                         f"row {first[:8]}; give --{what}-col NAME or a 0-based index")

    named = any(c is not None and not str(c).lstrip("-").isdigit()
                for c in (opts.caption_col, opts.image_col, opts.key_col))
    header = opts.header if opts.header is not None else (
        named or any(n in names for n in CAPTION_NAMES + IMAGE_NAMES))
    if not header and (opts.caption_col is None or opts.image_col is None):
        raise InputError(f"{path} has no header row; give --caption-col and --image-col as "
                         f"0-based indices (CC3M: caption 0, url 1; CC12M: url 0, caption 1)")
    if not header:
        return int(opts.caption_col), int(opts.image_col), \
            (int(opts.key_col) if opts.key_col is not None else None), False
    return (find(opts.caption_col, CAPTION_NAMES, "caption"), find(opts.image_col, IMAGE_NAMES, "image"),
            find(opts.key_col, ("key",), "key"), True)


def _field_count(path: str, fmt: str, header: bool) -> Optional[int]:
    """Fields every row must have: the header's count, else the most common count among
    the first rows (ties go to the smaller count: a stray delimiter adds fields, never
    removes one). None for a header-less file without rows."""
    counts: Counter = Counter()
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            try:
                fields = len(_split(_decode(raw), fmt))
            except csv.Error:
                continue
            if header:
                return fields
            counts[fields] += 1
            if n + 1 >= FIELD_COUNT_SAMPLE_ROWS:
                break
    if not counts:
        return None
    return min(counts, key=lambda c: (-counts[c], c))


def plan(path: str, opts: ReaderOptions) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"TSV/CSV input must be a file: {path}")
    fmt = "csv" if path.lower().endswith(".csv") else "tsv"
    cap, img, key, header = _columns(path, fmt, opts)
    fields = _field_count(path, fmt, header)
    need = max(cap, img, key if key is not None else 0)
    if fields is not None and need >= fields:
        raise InputError(f"{path}: column index {need} is out of range: its rows have {fields} "
                         f"fields (0-based indices 0-{fields - 1}); check --caption-col/--image-col/--key-col")
    units, offset, row, start_row, start_off = [], 0, 0, 0, None
    with open(path, "rb") as f:
        if header:
            offset += len(f.readline())
        for line in f:
            if start_off is None:
                start_off, start_row = offset, row
            offset += len(line)
            row += 1
            if row - start_row == opts.rows_per_unit:
                units.append({"path": path, "offset": start_off, "rows": row - start_row,
                              "first_row": start_row})
                start_off = None
    if start_off is not None:
        units.append({"path": path, "offset": start_off, "rows": row - start_row, "first_row": start_row})
    for u in units:
        u.update(delim=fmt, caption_idx=cap, image_idx=img, key_idx=key, fields=fields,
                 header=header)
    return units


def read(unit: dict, opts: ReaderOptions) -> Iterator[RawPair | Reject]:
    source = unit["source"]
    root = opts.image_root or os.path.dirname(os.path.abspath(unit["path"]))
    with open(unit["path"], "rb") as f:
        f.seek(unit["offset"])
        for i in range(unit["rows"]):
            row_no = unit["first_row"] + i
            where = f"row {row_no} (line {row_no + 1 + int(unit['header'])} of {unit['path']})"
            line = _decode(f.readline())
            try:
                fields = _split(line, unit["delim"])
            except csv.Error as e:
                yield Reject("malformed_row", f"{source}/{row_no:09d}", f"{where}: {e}", source)
                continue
            if len(fields) != unit["fields"]:
                more = " (a raw delimiter inside the caption?)" if len(fields) > unit["fields"] else ""
                yield Reject("malformed_row", f"{source}/{row_no:09d}",
                             f"{where}: {len(fields)} fields, expected {unit['fields']}{more}: "
                             f"{line[:120]!r}", source)
                continue
            key = fields[unit["key_idx"]] if unit["key_idx"] is not None else f"{row_no:09d}"
            caption = fields[unit["caption_idx"]]
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:  # surrogates: the bytes were not UTF-8
                caption = caption.encode("utf-8", "surrogateescape")
            image = fields[unit["image_idx"]].strip()
            if not image:
                yield Reject("malformed_row", f"{source}/{key}", "empty image column", source)
                continue
            yield RawPair(key=key, caption=caption, source=source,
                          image_path=resolve_image_path(image, root))
