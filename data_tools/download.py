"""``albef-data download``: a URL list (CC3M, CC12M, SBU as distributed) -> images, with
img2dataset, into a folder that ``albef-data convert`` reads.

Steps:

1. The URL list (TSV/CSV with or without a header, Parquet, JSON list or JSON lines) is
   read in batches (:mod:`data_tools.url_list`) into ``OUT/_url_list/urls.parquet``:
   ``url``, ``caption`` and ``line`` (the row's line in the list, so a sample's JSON names
   the line it came from). Rows that cannot be used are refused here, before any download,
   each with its line and a reason: a blank line, a wrong field count, bytes that are not
   UTF-8, an empty URL or caption, a URL that an earlier line already gave.
2. ``img2dataset.download`` fetches them into ``OUT`` in its ``webdataset`` layout
   (``{shard:05d}.tar`` + ``{shard}.parquet`` + ``{shard}_stats.json``): one tar per
   shard, read byte for byte by the convert's webdataset reader. Without
   ``--image-size`` images are stored exactly as served (no decode, no re-encode);
   ``albef-data convert`` checks later that each one decodes (``corrupt_image``).
3. The per-shard ``_stats.json`` files are summed: URLs tried, downloaded, failed by
   reason (HTTP status, timeout, connection error, decode error, ...); the failed URLs,
   which img2dataset lists only in its ``{shard}.parquet`` files, join the refused rows in
   ``OUT/rejects.jsonl`` (:mod:`data_tools.rejects`), in line order, and the list's lines
   are accounted for: header + downloaded + rejected.

Re-running the same command into the same ``OUT`` resumes: img2dataset skips the shards
that have their ``_stats.json``. A different URL list or other columns into the same
folder is refused (``OUT/_url_list/source.json`` records them).

img2dataset is an optional dependency (``pip install "albef-ds[download]"``); it is
imported only when a download starts.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Optional

from data_tools import rejects as R
from data_tools.readers import InputError
from data_tools.url_list import (
    LIST_REJECTS_FILE,
    URL_LIST_DIR,
    URLS_FILE,
    write_url_list,
)

#: what to install when img2dataset is missing (setup.py's extra)
EXTRA_HINT = 'pip install "albef-ds[download]"  (or: pip install "img2dataset>=1.47")'
#: img2dataset's output layout: tars that the convert's webdataset reader reads as they are
OUTPUT_FORMAT = "webdataset"
#: written into source.json: a folder downloaded by a version with other files (the URL
#: list's ``row`` column, no rejects file) is refused rather than resumed into
LAYOUT = 2
#: the download's summary, in OUT/_url_list (convert reads it to account for the list's lines)
STATS_FILE = "download_stats.json"

class MissingExtraError(RuntimeError):
    """img2dataset (the ``download`` extra) is not installed."""


@dataclass
class DownloadOptions:
    out: str
    fmt: Optional[str] = None               # tsv | csv | parquet | json (default: from the extension)
    url_col: Optional[str] = None           # name, or 0-based index (header-less TSV/CSV)
    caption_col: Optional[str] = None
    header: Optional[bool] = None           # TSV/CSV: None = a first row holding a URL is data
    image_size: Optional[int] = None        # None: store images as served; N: shorter side to N (JPEG)
    processes: int = 1
    threads: int = 32
    timeout: int = 10                       # seconds per request
    retries: int = 0
    samples_per_shard: int = 10_000         # img2dataset's default; also the convert's unit


def import_img2dataset():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
    try:
        import img2dataset
    except ImportError as e:
        raise MissingExtraError(f"img2dataset is not installed ({e}); install the download extra: "
                                f"{EXTRA_HINT}") from e
    return img2dataset


# ----------------------------------------------------------------------------- the URL list

def _source_record(url_list: str, opts: DownloadOptions) -> dict:
    """What a resumed download must share with the first run (the list and what shapes the shards)."""
    return {"layout": LAYOUT, "url_list": os.path.abspath(url_list), "size": os.path.getsize(url_list),
            "format": opts.fmt, "url_col": opts.url_col, "caption_col": opts.caption_col,
            "header": opts.header, "image_size": opts.image_size,
            "samples_per_shard": opts.samples_per_shard}


def _check_source(url_list: str, opts: DownloadOptions) -> Optional[dict]:
    """The recorded list summary when OUT already holds this list's download (a resume)."""
    record = _source_record(url_list, opts)
    path = os.path.join(opts.out, URL_LIST_DIR, "source.json")
    if os.path.exists(path) and os.path.exists(os.path.join(opts.out, URL_LIST_DIR, URLS_FILE)):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = [k for k in record if old.get(k) != record[k]]
        if diff:
            raise InputError(f"{opts.out} holds a download of another URL list or settings (differs in "
                             f"{', '.join(diff)}); use a new --out folder")
        return old["list"]
    return None


def _record_source(url_list: str, opts: DownloadOptions, summary: dict) -> None:
    record = {**_source_record(url_list, opts), "list": summary}
    with open(os.path.join(opts.out, URL_LIST_DIR, "source.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------- img2dataset

def run_img2dataset(opts: DownloadOptions) -> None:
    i2d = import_img2dataset()
    resize = ({"disable_all_reencoding": True} if opts.image_size is None else
              {"image_size": opts.image_size, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
               "encode_format": "jpg", "encode_quality": 95})
    i2d.download(
        url_list=os.path.join(opts.out, URL_LIST_DIR, URLS_FILE), input_format="parquet",
        url_col="url", caption_col="caption", save_additional_columns=["line"],
        output_folder=opts.out, output_format=OUTPUT_FORMAT,
        processes_count=opts.processes, thread_count=opts.threads, timeout=opts.timeout,
        retries=opts.retries, number_sample_per_shard=opts.samples_per_shard,
        extract_exif=False, enable_wandb=False, incremental_mode="incremental", **resize)


# ----------------------------------------------------------------------------- the summary

_HTTP = re.compile(r"HTTP Error (\d{3})")


def failure_reason(message: str) -> str:
    """img2dataset's error message (urllib's or its resizer's) -> a short reason."""
    m = _HTTP.search(message)
    if m:
        return f"HTTP {m.group(1)}"
    low = message.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "decod" in low:
        return "decode error"
    if "x-robots-tag" in low:
        return "disallowed by X-Robots-Tag"
    if "hash mismatch" in low:
        return "hash mismatch"
    if "image too small" in low or "too large" in low:
        return message
    if "urlopen error" in low or "connection" in low or "name or service" in low or "unknown url type" in low:
        return "connection error"
    return f"other ({message[:80]})"


def read_stats(out: str) -> dict:
    """Sum img2dataset's ``{shard}_stats.json`` files under ``out``."""
    totals = {"shards": 0, "tried": 0, "downloaded": 0, "failed": Counter(), "messages": Counter()}
    for path in sorted(glob.glob(os.path.join(out, "*_stats.json"))):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        totals["shards"] += 1
        totals["tried"] += int(s.get("count", 0))
        totals["downloaded"] += int(s.get("successes", 0))
        for message, n in (s.get("status_dict") or {}).items():
            if message == "success":
                continue
            totals["failed"][failure_reason(message)] += n
            totals["messages"][message] += n
    return totals


def failed_rows(out: str) -> Iterator[dict]:
    """The URLs img2dataset stored no image for, as rejects in line order. They are listed
    only in its ``{shard}.parquet`` files (every URL of the shard, its status and error);
    shard n holds the n-th run of the list's rows, so shard by shard, each sorted, is line
    order."""
    import pyarrow.parquet as pq

    for path in sorted(glob.glob(os.path.join(out, "[0-9]*.parquet"))):
        table = pq.read_table(path)
        names = set(table.column_names)
        rows = table.select([c for c in ("line", "url", "caption", "status", "error_message") if c in names])
        failed = [r for r in rows.to_pylist() if r.get("status") != "success"]
        for r in sorted(failed, key=R.line_key):
            message = r.get("error_message") or r.get("status") or "no image stored"
            if r.get("status") == "failed_to_resize":  # with --image-size: what came is no image it reads
                reason, detail = "corrupt_image", f"not an image img2dataset could decode ({message[:160]})"
            else:
                reason, detail = "download_failed", failure_reason(message)
            yield R.record(reason, detail, "download", r.get("line"), r.get("url"), r.get("caption"))


def list_lines(listed: dict, path: str) -> list[str]:
    """The URL list's accounting before any download, with examples of each reason."""
    lines = [f"download: URL list {path}: " + R.accounting_line(
        listed["unit"], listed["lines"], listed["header"], listed["kept"], "URLs to download",
        listed["dropped"], None)]
    for reason, n in Counter(listed["dropped"]).most_common():
        ex = "; ".join(listed["examples"].get(reason, []))
        lines.append(f"download:   dropped {n} ({reason}){': e.g. ' + ex if ex else ''}")
    return lines


def summary_lines(totals: dict, listed: dict, rejected: dict, rejects_path: str) -> list[str]:
    """URLs tried, downloaded and failed by reason, then the list's lines accounted for."""
    failed = totals["tried"] - totals["downloaded"]
    shards = f"{totals['shards']} shard{'s' if totals['shards'] != 1 else ''}"
    tried = f"download: tried {totals['tried']} URLs in {shards}: {totals['downloaded']} downloaded, {failed} failed"
    lines = [tried]
    for reason, n in totals["failed"].most_common():
        lines.append(f"download:   {reason}: {n}")
    lines.append("download: " + R.accounting_line(listed["unit"], listed["lines"], listed["header"],
                                                  totals["downloaded"], "downloaded", rejected, rejects_path))
    return lines


def download_summary(folder: str) -> Optional[dict]:
    """What ``albef-data download`` recorded in ``folder`` (its ``_url_list/download_stats.json``:
    the list's ``url_list`` path and ``list`` counts, the ``rejects`` by reason), or None for a
    folder it did not finish writing (or did not write)."""
    path = os.path.join(folder, URL_LIST_DIR, STATS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    return summary if "rejects" in summary and "lines" in summary.get("list", {}) else None


def nothing_downloaded_message(totals: dict, out: str) -> str:
    top = totals["messages"].most_common(1)
    most = f" (most: {top[0][0][:120]!r}, {top[0][1]} URLs)" if top else ""
    return (f"downloaded 0 of {totals['tried']} images{most}: check that this machine reaches the "
            f"image hosts (compute nodes often have no internet: download on a login node), "
            f"--url-col, and --timeout; per-shard details in {os.path.join(out, '*_stats.json')}")


def download(url_list: str, opts: DownloadOptions) -> dict:
    """Download ``url_list`` into ``opts.out``; returns the summed statistics
    (``tried``, ``downloaded``, ``failed`` by reason) and the URL list's counts."""
    import_img2dataset()  # fail before any work when the extra is missing
    if not os.path.isfile(url_list):
        raise InputError(f"URL list does not exist: {url_list}")
    os.makedirs(opts.out, exist_ok=True)
    listed = _check_source(url_list, opts)
    if listed is None:
        print(f"download: reading {url_list}", file=sys.stderr)
        listed = write_url_list(url_list, opts)
        _record_source(url_list, opts, listed)
    else:
        print(f"download: resuming into {opts.out} (shards with a _stats.json are skipped)", file=sys.stderr)
    for line in list_lines(listed, url_list):
        print(line, file=sys.stderr)
    if not listed["kept"]:
        raise InputError(f"{url_list}: no row with both a URL and a caption (of {listed['read']} rows; "
                         f"rejected: {R.count_text(listed['dropped'])}, each listed in "
                         f"{os.path.join(opts.out, URL_LIST_DIR, LIST_REJECTS_FILE)}); check "
                         f"--url-col/--caption-col and --header")
    print(f"download: {listed['kept']} URLs -> {opts.out} ({OUTPUT_FORMAT} shards of {opts.samples_per_shard}, "
          f"{opts.processes} processes x {opts.threads} threads, timeout {opts.timeout}s, "
          f"{'images as served' if opts.image_size is None else f'shorter side <= {opts.image_size} px'})",
          file=sys.stderr)
    run_img2dataset(opts)
    totals = read_stats(opts.out)
    rejects_path = os.path.join(opts.out, R.FILE_NAME)
    list_rejects = os.path.join(opts.out, URL_LIST_DIR, LIST_REJECTS_FILE)
    rejected = R.write(rejects_path, R.merged_by_line(R.read(list_rejects), failed_rows(opts.out)))
    for line in summary_lines(totals, listed, rejected, rejects_path):
        print(line, file=sys.stderr)
    totals["url_list"] = os.path.abspath(url_list)
    totals["list"] = listed
    totals["rejects"] = {"path": os.path.abspath(rejects_path), "rows": sum(rejected.values()),
                         "by_reason": dict(rejected)}
    totals["options"] = asdict(opts)
    with open(os.path.join(opts.out, URL_LIST_DIR, STATS_FILE), "w", encoding="utf-8") as f:
        json.dump({k: (dict(v) if isinstance(v, Counter) else v) for k, v in totals.items()}, f, indent=1)
    return totals
