"""The rejects file: every input row that did not become a pair, listed once, with why.

``rejects.jsonl`` is JSON lines (UTF-8), one object per rejected row, in input-line order
where the rows have a line number. ``albef-data download`` writes one in its image folder
(the rows refused while reading the URL list, then the failed downloads); ``albef-data
convert`` of that folder writes one beside its shards that holds those rows too, followed
into place by what convert itself rejected, so one file covers URL list -> download ->
convert. Fields:

- ``line``: the 1-based line of the URL list (TSV/CSV/JSON lines; the 1-based row of a
  Parquet list or entry of a JSON list), or absent when the input has no such number (a
  convert input that did not come from ``albef-data download``);
- ``url``, ``caption``: as the list gave them (bytes that are not UTF-8 shown as ``\\xNN``);
- ``reason``: a short code, one of :data:`LIST_REASONS`, :data:`DOWNLOAD_REASONS` or
  ``data_tools.records.REASONS`` (what the counts are keyed by);
- ``detail``: the same in plain words for this row ("HTTP 404", "same URL as line 3",
  "not an image (cannot identify image file)");
- ``stage``: ``list`` (refused before any download), ``download`` (img2dataset) or
  ``convert``; convert's rows also carry ``source`` and ``key`` (the sample's key).
"""
from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator

FILE_NAME = "rejects.jsonl"

#: why a URL-list row is refused before any download (data_tools/download.py)
LIST_REASONS = (
    "blank_line",       # no URL and no caption on the line
    "malformed_row",    # another field count than the first row's (a raw tab inside a caption)
    "not_utf8",         # the URL or the caption holds bytes that are not UTF-8
    "empty_url",
    "empty_caption",
    "duplicate_url",    # the URL of an earlier line: the first is kept, the detail names it
)
#: why img2dataset stored no image for a URL
DOWNLOAD_REASONS = (
    "download_failed",  # HTTP error, timeout, connection error, ... (the detail says which)
    "corrupt_image",    # with --image-size: img2dataset could not decode what it got
)


def record(reason: str, detail: str, stage: str, line: int | None = None, url: str | None = None,
           caption: str | None = None, **more) -> dict:
    """One row of the rejects file, its fields in a fixed order."""
    row: dict = {}
    if line is not None:
        row["line"] = int(line)
    if url is not None:
        row["url"] = url
    if caption is not None:
        row["caption"] = caption
    row.update(reason=reason, detail=detail, stage=stage, **more)
    return row


def shown_text(value) -> str:
    """A URL or caption for the file: str as it is, undecodable bytes with ``\\xNN`` escapes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return "" if value is None else str(value)


def line_key(row: dict) -> float:
    """Sort key: the input line; rows without one after every numbered row."""
    line = row.get("line")
    return float("inf") if line is None else line


def read(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for text in f:
            if text.strip():
                yield json.loads(text)


def write(path: str, rows: Iterable[dict]) -> Counter:
    """Write ``rows`` to ``path`` (atomically: a temporary file renamed into place);
    returns the count per reason."""
    counts: Counter = Counter()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            counts[row["reason"]] += 1
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return counts


def merged_by_line(*streams: Iterable[dict]) -> Iterator[dict]:
    """Rows of several streams, each already in line order, as one stream in line order
    (ties keep the order of the streams: the list's rows before the download's)."""
    return heapq.merge(*streams, key=line_key)


def count_text(counts: dict) -> str:
    """``malformed_row 1, not_utf8 1``: the non-zero counts, largest first, in one phrase."""
    shown = [(reason, n) for reason, n in Counter(counts).most_common() if n]
    return ", ".join(f"{reason} {n}" for reason, n in shown) or "none"


def accounting_line(unit: str, lines: int, header: int, pairs: int, pairs_word: str, rejected: dict,
                    path: str | None) -> str:
    """``12 lines = 1 header + 4 pairs written + 7 rejected (...)``, and where they are
    listed (``path``, when given); says so when the parts do not add up to the lines."""
    n_rejected = sum(rejected.values())
    text = (f"{lines} {unit} = {header} header + {pairs} {pairs_word} + {n_rejected} rejected "
            f"({count_text(rejected)})")
    if path is not None:
        text += f"; each rejected {unit.rstrip('s').replace('entrie', 'entry')} once in {path}"
    gap = lines - header - pairs - n_rejected
    if gap:
        text += (f"; {abs(gap)} {unit} {'unaccounted for' if gap > 0 else 'counted twice'} "
                 f"(an unfinished download or conversion?)")
    return text
