"""``albef-data download``: a URL list (CC3M, CC12M, SBU as distributed) -> images, with
img2dataset, into a folder that ``albef-data convert`` reads.

Steps:

1. The URL list (TSV/CSV with or without a header, Parquet, JSON list or JSON lines) is
   read in batches and written as ``OUT/_url_list/urls.parquet`` with three columns:
   ``url``, ``caption`` and ``row`` (the 0-based data row of the input, so a sample's
   JSON names the line it came from). Rows that cannot be used are dropped and counted
   here, before any download: a wrong field count, an empty URL, an empty caption.
2. ``img2dataset.download`` fetches them into ``OUT`` in its ``webdataset`` layout
   (``{shard:05d}.tar`` + ``{shard}.parquet`` + ``{shard}_stats.json``): one tar per
   shard, read byte for byte by the convert's webdataset reader. Without
   ``--image-size`` images are stored exactly as served (no decode, no re-encode);
   ``albef-data convert`` checks later that each one decodes (``corrupt_image``).
3. The per-shard ``_stats.json`` files are summed: URLs tried, downloaded, failed by
   reason (HTTP status, timeout, connection error, decode error, ...).

Re-running the same command into the same ``OUT`` resumes: img2dataset skips the shards
that have their ``_stats.json``. A different URL list or other columns into the same
folder is refused (``OUT/_url_list/source.json`` records them).

img2dataset is an optional dependency (``pip install "albef-ds[download]"``); it is
imported only when a download starts.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

from data_tools.readers import InputError, looks_like_url

#: what to install when img2dataset is missing (setup.py's extra)
EXTRA_HINT = 'pip install "albef-ds[download]"  (or: pip install "img2dataset>=1.47")'
#: img2dataset's output layout: tars that the convert's webdataset reader reads as they are
OUTPUT_FORMAT = "webdataset"
#: the normalised URL list, inside OUT (a sub-folder: img2dataset reads OUT/*.json as its shards)
URL_LIST_DIR = "_url_list"
#: header names tried, in order, when --url-col / --caption-col are not given
URL_NAMES = ("url", "image_url", "imageurl", "link")
CAPTION_NAMES = ("caption", "text", "alt", "title")
#: rows per batch read from the URL list (bounded memory for CC12M's 12 M rows)
BATCH_ROWS = 65_536
#: examples kept per drop reason for the summary
EXAMPLES = 3


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

def detect_list_format(path: str) -> str:
    ext = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".tsv", "tsv"), (".txt", "tsv"), (".csv", "csv"), (".parquet", "parquet"),
                        (".json", "json"), (".jsonl", "json")):
        if ext.endswith(suffix):
            return fmt
    raise InputError(f"cannot tell the format of URL list {path} from its extension; "
                     f"pass --input-format tsv|csv|parquet|json")


def _first_row(path: str, delimiter: str) -> list[str]:
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        line = f.readline()
    if not line:
        raise InputError(f"URL list {path} is empty")
    return line.rstrip("\r\n").split(delimiter)


def _pick(spec: Optional[str], names: list[str], candidates: tuple, what: str, path: str,
          header: bool) -> int:
    """The index of a column given by name or 0-based index, or found among ``candidates``."""
    if spec is not None:
        if spec.lstrip("-").isdigit():
            i = int(spec)
            if not 0 <= i < len(names):
                raise InputError(f"{path}: --{what}-col {i} is past the {len(names)} columns of its first row")
            return i
        if not header:
            raise InputError(f"{path}: --{what}-col {spec!r} is a name but the list has no header row; "
                             f"give a 0-based index")
        if spec not in names:
            raise InputError(f"{path}: no column {spec!r} (columns: {', '.join(names)})")
        return names.index(spec)
    lower = [n.lower() for n in names]
    for c in candidates:
        if c in lower:
            return lower.index(c)
    raise InputError(f"{path}: cannot tell the {what} column (columns: {', '.join(names)}); pass --{what}-col")


def _columns_headerless(first: list[str], opts: DownloadOptions, path: str) -> tuple[int, int]:
    """CC3M is ``caption<TAB>url``, CC12M ``url<TAB>caption``: with two columns and no
    options, the one whose first value is a URL is the URL column."""
    url_like = [i for i, v in enumerate(first) if looks_like_url(v.strip())]
    if opts.url_col is None and opts.caption_col is None:
        if len(first) == 2 and len(url_like) == 1:
            return url_like[0], 1 - url_like[0]
        raise InputError(f"{path}: no header row and {len(first)} columns (first row: {first[:4]!r}); "
                         f"pass --url-col and --caption-col as 0-based indexes")
    names = [str(i) for i in range(len(first))]
    if opts.url_col is not None:
        url = _pick(opts.url_col, names, (), "url", path, header=False)
    else:  # the caption column was given: the URL is the other URL-looking one
        others = [i for i in url_like if str(i) != opts.caption_col]
        if not others:
            raise InputError(f"{path}: pass --url-col (no column of the first row holds a URL)")
        url = others[0]
    if opts.caption_col is not None:
        caption = _pick(opts.caption_col, names, (), "caption", path, header=False)
    elif len(first) == 2:
        caption = 1 - url
    else:
        raise InputError(f"{path}: pass --caption-col (a 0-based index: {len(first)} columns)")
    return url, caption


def _delimited_batches(path: str, fmt: str, opts: DownloadOptions, drops: Counter, examples: dict):
    """(url, caption) column batches of a TSV/CSV, bad rows counted in ``drops``."""
    import pyarrow.csv as pcsv

    delimiter = "\t" if fmt == "tsv" else ","
    first = _first_row(path, delimiter)
    header = opts.header
    if header is None:  # a first row that holds a URL is data (CC3M/CC12M have no header)
        header = not any(looks_like_url(v.strip()) for v in first)
        print(f"download: {path}: {'a header row' if header else 'no header row (its first row holds a URL)'}"
              f" (--header/--no-header to say otherwise)", file=sys.stderr)
    if header:
        names = [n.strip() for n in first]
        url = _pick(opts.url_col, names, URL_NAMES, "url", path, header=True)
        caption = _pick(opts.caption_col, names, CAPTION_NAMES, "caption", path, header=True)
    else:
        url, caption = _columns_headerless(first, opts, path)
    print(f"download: {path}: url column {url}, caption column {caption}", file=sys.stderr)

    malformed_lines: list[int] = []  # in file order: what the parsed rows' line numbers skip

    def bad_row(row) -> str:
        drops["malformed_row"] += 1
        malformed_lines.append(row.number)
        ex = examples.setdefault("malformed_row", [])
        if len(ex) < EXAMPLES:
            ex.append(f"line {row.number}: {row.actual_columns} fields, expected {row.expected_columns}: "
                      f"{row.text[:100]!r}")
        return "skip"

    n = len(first)
    read = pcsv.ReadOptions(column_names=[f"c{i}" for i in range(n)], skip_rows=1 if header else 0,
                            block_size=1 << 24, use_threads=False)
    parse = pcsv.ParseOptions(delimiter=delimiter, quote_char=False if fmt == "tsv" else '"',
                              invalid_row_handler=bad_row, newlines_in_values=False)
    # Read as bytes: one invalid UTF-8 byte would otherwise fail the whole list; such a row is
    # dropped and counted (convert counts a caption like it as bad_caption).
    convert = pcsv.ConvertOptions(column_types={f"c{i}": "binary" for i in range(n)},
                                  include_columns=[f"c{url}", f"c{caption}"], strings_can_be_null=False)
    parsed = 0  # rows parsed before the batch

    def line_of(index: int) -> int:
        """The file line of the parsed row ``index``: past the header and the malformed lines
        before it (all of them already seen: a batch is yielded once its block is parsed)."""
        line = index + 1 + int(header)
        while (moved := index + 1 + int(header) + bisect.bisect_right(malformed_lines, line)) != line:
            line = moved
        return line

    try:
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            urls, captions = batch.column(f"c{url}"), batch.column(f"c{caption}")
            yield _valid_utf8(urls, captions, lambda i, first=parsed: line_of(first + i), drops, examples)
            parsed += batch.num_rows
    except Exception as e:  # pyarrow.ArrowInvalid and friends: the message names the line
        raise InputError(f"cannot read URL list {path}: {e}") from e


def _valid_utf8(urls, captions, line_of, drops: Counter, examples: dict):
    """The two binary columns as strings, rows whose URL or caption is not UTF-8 left out and
    counted as ``not_utf8`` (examples name the file line, ``line_of(row in batch)``, and show
    the bytes)."""
    import pyarrow as pa
    try:
        return urls.cast(pa.string()), captions.cast(pa.string())
    except pa.ArrowInvalid:
        pass
    keep_urls, keep_captions = [], []
    for i, (u, c) in enumerate(zip(urls.to_pylist(), captions.to_pylist())):
        try:
            keep_urls.append(u.decode("utf-8"))
            keep_captions.append(c.decode("utf-8"))
        except UnicodeDecodeError:
            if len(keep_urls) > len(keep_captions):
                keep_urls.pop()
            drops["not_utf8"] += 1
            ex = examples.setdefault("not_utf8", [])
            if len(ex) < EXAMPLES:
                ex.append(f"line {line_of(i)}: {c[:100]!r}")
    return pa.array(keep_urls, pa.string()), pa.array(keep_captions, pa.string())


def _table_batches(path: str, fmt: str, opts: DownloadOptions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise InputError(f"cannot read URL list {path}: {e}") from e
        names = pf.schema_arrow.names
        batches = lambda cols: pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)  # noqa: E731
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if text.lstrip().startswith("["):
                rows = json.loads(text)
            else:  # JSON lines
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"URL list {path} is not JSON or JSON lines: {e}") from e
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"URL list {path}: expected a list of objects, one per image")
        names = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])
        batches = lambda cols: table.select(cols).to_batches(max_chunksize=BATCH_ROWS)  # noqa: E731
    url = names[_pick(opts.url_col, names, URL_NAMES, "url", path, header=True)]
    caption = names[_pick(opts.caption_col, names, CAPTION_NAMES, "caption", path, header=True)]
    print(f"download: {path}: url column {url!r}, caption column {caption!r}", file=sys.stderr)
    for b in batches([url, caption]):
        yield b.column(0).cast(pa.string()), b.column(1).cast(pa.string())


def write_url_list(path: str, opts: DownloadOptions) -> dict:
    """Read the URL list into ``OUT/_url_list/urls.parquet``; returns rows read, kept and
    dropped by reason (with examples)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise InputError(f"URL list does not exist: {path}")
    fmt = opts.fmt or detect_list_format(path)
    drops, examples = Counter(), {}
    batches = (_delimited_batches(path, fmt, opts, drops, examples) if fmt in ("tsv", "csv")
               else _table_batches(path, fmt, opts))
    folder = os.path.join(opts.out, URL_LIST_DIR)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"urls.parquet.{os.getpid()}.tmp")
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("row", pa.int64())])
    read = kept = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for urls, captions in batches:
            urls = pc.utf8_trim_whitespace(urls.fill_null(""))
            captions = pc.utf8_trim_whitespace(captions.fill_null(""))
            rows = pa.array(range(read, read + len(urls)), pa.int64())
            read += len(urls)
            ok = pc.and_(pc.not_equal(pc.utf8_length(urls), 0), pc.not_equal(pc.utf8_length(captions), 0))
            for reason, bad in (("empty_url", pc.equal(pc.utf8_length(urls), 0)),
                                ("empty_caption", pc.and_(pc.not_equal(pc.utf8_length(urls), 0),
                                                          pc.equal(pc.utf8_length(captions), 0)))):
                n = pc.sum(bad).as_py() or 0
                if n:
                    drops[reason] += n
                    ex = examples.setdefault(reason, [])
                    ex.extend(f"row {r}" for r in pc.filter(rows, bad).to_pylist()[:EXAMPLES - len(ex)])
            batch = pa.table({"url": urls, "caption": captions, "row": rows}, schema=schema).filter(ok)
            kept += batch.num_rows
            writer.write_table(batch)
    os.replace(tmp, os.path.join(folder, "urls.parquet"))
    return {"read": read, "kept": kept, "dropped": dict(drops), "examples": examples, "format": fmt}


def _source_record(url_list: str, opts: DownloadOptions) -> dict:
    """What a resumed download must share with the first run (the list and what shapes the shards)."""
    return {"url_list": os.path.abspath(url_list), "size": os.path.getsize(url_list),
            "format": opts.fmt, "url_col": opts.url_col, "caption_col": opts.caption_col,
            "header": opts.header, "image_size": opts.image_size,
            "samples_per_shard": opts.samples_per_shard}


def _check_source(url_list: str, opts: DownloadOptions) -> Optional[dict]:
    """The recorded list summary when OUT already holds this list's download (a resume)."""
    record = _source_record(url_list, opts)
    path = os.path.join(opts.out, URL_LIST_DIR, "source.json")
    if os.path.exists(path) and os.path.exists(os.path.join(opts.out, URL_LIST_DIR, "urls.parquet")):
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
        url_list=os.path.join(opts.out, URL_LIST_DIR, "urls.parquet"), input_format="parquet",
        url_col="url", caption_col="caption", save_additional_columns=["row"],
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


def summary_lines(totals: dict, listed: dict, out: str) -> list[str]:
    lines = [f"download: URL list: {listed['read']} rows, {listed['kept']} with a URL and a caption"]
    for reason, n in sorted(listed["dropped"].items()):
        ex = "; ".join(listed["examples"].get(reason, []))
        lines.append(f"download:   dropped {n} ({reason}){': e.g. ' + ex if ex else ''}")
    failed = totals["tried"] - totals["downloaded"]
    shards = f"{totals['shards']} shard{'s' if totals['shards'] != 1 else ''}"
    lines.append(f"download: tried {totals['tried']} URLs in {shards}: "
                 f"{totals['downloaded']} downloaded, {failed} failed")
    for reason, n in totals["failed"].most_common():
        lines.append(f"download:   {reason}: {n}")
    return lines


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
    if not listed["kept"]:
        raise InputError(f"{url_list}: no row with both a URL and a caption (of {listed['read']} rows; "
                         f"dropped: {listed['dropped']}); check --url-col/--caption-col and --header")
    print(f"download: {listed['kept']} URLs -> {opts.out} ({OUTPUT_FORMAT} shards of {opts.samples_per_shard}, "
          f"{opts.processes} processes x {opts.threads} threads, timeout {opts.timeout}s, "
          f"{'images as served' if opts.image_size is None else f'shorter side <= {opts.image_size} px'})",
          file=sys.stderr)
    run_img2dataset(opts)
    totals = read_stats(opts.out)
    for line in summary_lines(totals, listed, opts.out):
        print(line, file=sys.stderr)
    totals["list"] = listed
    totals["options"] = asdict(opts)
    with open(os.path.join(opts.out, URL_LIST_DIR, "download_stats.json"), "w", encoding="utf-8") as f:
        json.dump({k: (dict(v) if isinstance(v, Counter) else v) for k, v in totals.items()}, f, indent=1)
    return totals
