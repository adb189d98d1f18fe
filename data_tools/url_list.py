"""A URL list (TSV/CSV with or without a header, Parquet, JSON list or JSON lines) read
into what ``albef-data download`` hands img2dataset, every row accounted for.

:func:`write_url_list` writes, in ``OUT/_url_list/``:

- ``urls.parquet``: ``url``, ``caption`` and ``line`` (the row's 1-based line in the list,
  header counted; the 1-based row or entry of a Parquet or JSON list), the rows to download;
- ``list_rejects.jsonl``: every other row, in line order, in the rejects file's layout
  (:mod:`data_tools.rejects`) with one of its ``LIST_REASONS``.

Each line of the list is the header, a row to download or a rejected row, so the summary's
counts add up to the list's lines (counted on their own, so a gap would show). A URL given
twice is downloaded once: the first line keeps it, each later one is ``duplicate_url``.
"""
from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np

from data_tools import rejects as R
from data_tools.readers import InputError, looks_like_url

#: the normalised URL list, inside OUT (a sub-folder: img2dataset reads OUT/*.json as its shards)
URL_LIST_DIR = "_url_list"
URLS_FILE = "urls.parquet"
LIST_REJECTS_FILE = "list_rejects.jsonl"
#: header names tried, in order, when --url-col / --caption-col are not given
URL_NAMES = ("url", "image_url", "imageurl", "link")
CAPTION_NAMES = ("caption", "text", "alt", "title")
#: rows per batch read from the URL list (bounded memory for CC12M's 12 M rows)
BATCH_ROWS = 65_536
#: examples kept per reason for the summary
EXAMPLES = 3
#: characters of a malformed line kept in its reject (the whole line is rarely needed)
LINE_TEXT_CHARS = 500


def detect_list_format(path: str) -> str:
    ext = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".tsv", "tsv"), (".txt", "tsv"), (".csv", "csv"), (".parquet", "parquet"),
                        (".json", "json"), (".jsonl", "json")):
        if ext.endswith(suffix):
            return fmt
    raise InputError(f"cannot tell the format of URL list {path} from its extension; "
                     f"pass --input-format tsv|csv|parquet|json")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def count_lines(path: str) -> int:
    """Lines of a text file (a last line without its newline counts), read in 1 MiB blocks."""
    lines, last = 0, b"\n"
    with _open_binary(path) as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _first_row(path: str, delimiter: str) -> list[str]:
    with _open_binary(path) as f:
        line = f.readline().decode("utf-8", errors="replace")
    if not line:
        raise InputError(f"URL list {path} is empty")
    return line.rstrip("\r\n").split(delimiter)


def _pick(spec: str | None, names: list[str], candidates: tuple, what: str, path: str,
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


def _columns_headerless(first: list[str], opts, path: str) -> tuple[int, int]:
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


class ListReading:
    """What one pass over a URL list found besides its rows: the line count, the header,
    rejects in line order and a few examples per reason."""

    def __init__(self, path: str, fmt: str, unit: str = "lines"):
        self.path, self.fmt, self.unit = path, fmt, unit
        self.lines = 0          # of the whole list, counted on their own (TSV/CSV) or as read
        self.header = 0         # 1 when the first line names the columns
        self.examples: dict[str, list[str]] = {}

    def example(self, reason: str, text: str) -> None:
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(text)


# ----------------------------------------------------------------------------- batches
# Each reader yields (urls, captions, lines, rejects): the three columns of the rows it
# could read (pyarrow string, string, int64) and the rows it refused up to the batch's last
# line, in line order, so that the rejects of successive batches follow each other.

def _delimited_batches(reading: ListReading, opts):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = reading.path
    delimiter = "\t" if reading.fmt == "tsv" else ","
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
    reading.header = int(header)
    reading.lines = count_lines(path)

    malformed: list[dict] = []       # refused by the parser, not yet handed on with a batch
    malformed_lines: list[int] = []  # all of them, in file order: what the rows' line numbers skip

    def bad_row(row) -> str:
        detail = (f"{row.actual_columns} field{'s' if row.actual_columns != 1 else ''}, expected "
                  f"{row.expected_columns}")
        malformed.append(R.record("malformed_row", detail, "list", row.number,
                                  text=row.text[:LINE_TEXT_CHARS]))
        malformed_lines.append(row.number)
        reading.example("malformed_row", f"line {row.number}: {detail}: {row.text[:100]!r}")
        return "skip"

    n = len(first)
    read = pcsv.ReadOptions(column_names=[f"c{i}" for i in range(n)], skip_rows=reading.header,
                            block_size=1 << 24, use_threads=False)
    # Empty lines are rows (of empty fields), not skipped: skipped, they would be missing
    # from the counts and shift every line number after them.
    parse = pcsv.ParseOptions(delimiter=delimiter, quote_char=False if reading.fmt == "tsv" else '"',
                              invalid_row_handler=bad_row, newlines_in_values=False, ignore_empty_lines=False)
    # Read as bytes: one invalid UTF-8 byte would otherwise fail the whole list; such a row is
    # refused as not_utf8 and the rest is read.
    convert = pcsv.ConvertOptions(column_types={f"c{i}": "binary" for i in range(n)},
                                  include_columns=[f"c{url}", f"c{caption}"], strings_can_be_null=False)
    parsed = 0  # rows parsed before the batch
    try:
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            if not batch.num_rows:
                continue
            # The file line of parsed row i: i + 1 + header, plus the malformed lines before it
            # (all of them already seen: a batch is yielded once its block is parsed). With
            # the malformed lines m_0 < m_1 < ..., that count is #{t : m_t - t <= i + 1 + header}.
            base = np.arange(parsed, parsed + batch.num_rows, dtype=np.int64) + 1 + reading.header
            shifted = np.asarray(malformed_lines, dtype=np.int64) - np.arange(len(malformed_lines))
            lines = base + np.searchsorted(shifted, base, side="right")
            parsed += batch.num_rows
            last = int(lines[-1])
            early = [r for r in malformed if r["line"] < last]
            malformed[:] = [r for r in malformed if r["line"] > last]
            urls, captions, lines, not_utf8 = _decoded(batch.column(f"c{url}"), batch.column(f"c{caption}"),
                                                       pa.array(lines), reading)
            yield urls, captions, lines, sorted(early + not_utf8, key=R.line_key)
    except Exception as e:  # pyarrow.ArrowInvalid and friends: the message names the line
        raise InputError(f"cannot read URL list {path}: {e}") from e
    if malformed:  # after the last row read
        empty = pa.array([], pa.string())
        yield empty, empty, pa.array([], pa.int64()), malformed


def _decoded(urls, captions, lines, reading: ListReading):
    """The two binary columns as strings, and the rows whose URL or caption is not UTF-8
    as ``not_utf8`` rejects (their bytes shown escaped)."""
    import pyarrow as pa
    try:
        return urls.cast(pa.string()), captions.cast(pa.string()), lines, []
    except pa.ArrowInvalid:
        pass
    keep, refused = [], []
    for i, (u, c) in enumerate(zip(urls.to_pylist(), captions.to_pylist())):
        bad = [what for what, value in (("URL", u), ("caption", c)) if not _is_utf8(value)]
        if not bad:
            keep.append(i)
            continue
        line = lines[i].as_py()
        refused.append(R.record("not_utf8", f"the {' and the '.join(bad)} holds bytes that are not UTF-8",
                                "list", line, R.shown_text(u), R.shown_text(c)))
        reading.example("not_utf8", f"line {line}: {c[:100]!r}")
    take = pa.array(keep, pa.int64())
    return (urls.take(take).cast(pa.string()), captions.take(take).cast(pa.string()), lines.take(take),
            refused)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _table_batches(reading: ListReading, opts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = reading.path
    blank_lines: list[int] = []
    if reading.fmt == "parquet":
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise InputError(f"cannot read URL list {path}: {e}") from e
        names = pf.schema_arrow.names
        reading.unit, reading.lines = "rows", pf.metadata.num_rows
        batches = lambda cols: pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)
        numbers = None  # row i is number i + 1
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if text.lstrip().startswith("["):
                rows = json.loads(text)
                reading.unit, numbers = "entries", None
            else:  # JSON lines: numbered by their line in the file, blank ones refused
                numbered = list(enumerate(text.splitlines(), start=1))
                blank_lines = [n for n, line in numbered if not line.strip()]
                numbered = [(n, line) for n, line in numbered if line.strip()]
                rows = [json.loads(line) for _, line in numbered]
                numbers = [n for n, _ in numbered]
                reading.lines = len(numbered) + len(blank_lines)
        except json.JSONDecodeError as e:
            raise InputError(f"URL list {path} is not JSON or JSON lines: {e}") from e
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"URL list {path}: expected a list of objects, one per image")
        if numbers is None:
            reading.lines = len(rows)
        names = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])
        batches = lambda cols: table.select(cols).to_batches(max_chunksize=BATCH_ROWS)
    url = names[_pick(opts.url_col, names, URL_NAMES, "url", path, header=True)]
    caption = names[_pick(opts.caption_col, names, CAPTION_NAMES, "caption", path, header=True)]
    print(f"download: {path}: url column {url!r}, caption column {caption!r}", file=sys.stderr)
    blanks = [R.record("blank_line", "an empty line", "list", n) for n in blank_lines]
    start = 0
    for b in batches([url, caption]):
        lines = (np.arange(start, start + b.num_rows) + 1 if numbers is None
                 else np.asarray(numbers[start:start + b.num_rows]))
        start += b.num_rows
        last = int(lines[-1]) if len(lines) else 0
        early = [r for r in blanks if r["line"] < last]
        blanks = [r for r in blanks if r["line"] > last]
        yield (b.column(0).cast(pa.string()), b.column(1).cast(pa.string()), pa.array(lines, pa.int64()),
               early)
    if blanks:
        empty = pa.array([], pa.string())
        yield empty, empty, pa.array([], pa.int64()), blanks


# ----------------------------------------------------------------------------- the list

def _refused_for_emptiness(urls, captions, lines, reading: ListReading) -> tuple:
    """(the mask of rows with a URL and a caption, the rejects of the others)."""
    import pyarrow.compute as pc

    has_url, has_caption = pc.not_equal(pc.utf8_length(urls), 0), pc.not_equal(pc.utf8_length(captions), 0)
    refused = []
    for reason, detail, bad in (
            ("blank_line", "no URL and no caption", pc.and_(pc.invert(has_url), pc.invert(has_caption))),
            ("empty_url", "no URL", pc.and_(pc.invert(has_url), has_caption)),
            ("empty_caption", "no caption", pc.and_(has_url, pc.invert(has_caption)))):
        if not pc.any(bad).as_py():
            continue
        for u, c, n in zip(*(pc.filter(col, bad).to_pylist() for col in (urls, captions, lines))):
            refused.append(R.record(reason, detail, "list", n, u, c))
            reading.example(reason, f"line {n}")
    return pc.and_(has_url, has_caption), refused


def write_url_list(path: str, opts) -> dict:
    """Read the URL list into ``OUT/_url_list/urls.parquet`` and ``list_rejects.jsonl``;
    returns its summary: ``lines`` (``unit``: lines, rows or entries), ``header``, ``read``
    (the data rows: lines less the header), ``kept`` (to download), ``dropped`` (count per
    reason), ``examples`` and ``format``. ``opts``: a DownloadOptions (out, fmt, url_col,
    caption_col, header)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise InputError(f"URL list does not exist: {path}")
    fmt = opts.fmt or detect_list_format(path)
    reading = ListReading(path, fmt)
    batches = (_delimited_batches(reading, opts) if fmt in ("tsv", "csv") else _table_batches(reading, opts))
    folder = os.path.join(opts.out, URL_LIST_DIR)
    os.makedirs(folder, exist_ok=True)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("line", pa.int64())])
    candidates = os.path.join(folder, f"candidates.parquet.{os.getpid()}.tmp")
    first_rejects = os.path.join(folder, f"rejects_first_pass.jsonl.{os.getpid()}.tmp")
    url_hashes: list[np.ndarray] = []  # of every candidate's URL, in order: what finds duplicates

    def refused_in_order(writer):
        for urls, captions, lines, early in batches:
            urls = pc.utf8_trim_whitespace(urls.fill_null(""))
            captions = pc.utf8_trim_whitespace(captions.fill_null(""))
            ok, refused = _refused_for_emptiness(urls, captions, lines, reading)
            yield from sorted(early + refused, key=R.line_key)
            batch = pa.table({"url": urls, "caption": captions, "line": lines}, schema=schema).filter(ok)
            writer.write_table(batch)
            url_hashes.append(np.fromiter(map(hash, batch.column("url").to_pylist()), np.int64, batch.num_rows))

    with pq.ParquetWriter(candidates, schema) as writer:
        refused_counts = R.write(first_rejects, refused_in_order(writer))
    hashes = np.concatenate(url_hashes) if url_hashes else np.zeros(0, np.int64)
    kept = _drop_duplicates(candidates, hashes, os.path.join(folder, URLS_FILE), first_rejects,
                            os.path.join(folder, LIST_REJECTS_FILE), refused_counts, reading)
    read = reading.lines - reading.header
    return {"format": fmt, "unit": reading.unit, "lines": reading.lines, "header": reading.header,
            "read": read, "kept": kept, "dropped": dict(refused_counts), "examples": reading.examples}


def _drop_duplicates(candidates: str, hashes: np.ndarray, urls_path: str, first_rejects: str,
                     rejects_path: str, counts, reading: ListReading) -> int:
    """Write the candidates to ``urls_path`` without the repeats of a URL (the first line
    keeps it), the repeats merged in line order into the rejects; returns the rows kept.
    Only URLs whose hash occurs twice are compared as strings: the rest needs no memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values, occurrences = np.unique(hashes, return_counts=True)
    repeated = values[occurrences > 1]
    if not len(repeated):
        os.replace(candidates, urls_path)
        os.replace(first_rejects, rejects_path)
        return len(hashes)
    first_line: dict[str, int] = {}
    duplicates: list[dict] = []
    kept, position = 0, 0
    table = pq.ParquetFile(candidates)
    with pq.ParquetWriter(f"{urls_path}.tmp", table.schema_arrow) as writer:
        for batch in table.iter_batches(batch_size=BATCH_ROWS):
            keep = np.ones(batch.num_rows, dtype=bool)
            urls, lines = batch.column("url").to_pylist(), batch.column("line").to_pylist()
            for i in np.flatnonzero(np.isin(hashes[position:position + batch.num_rows], repeated)):
                url, line = urls[i], lines[i]
                if url in first_line:
                    keep[i] = False
                    duplicates.append(R.record("duplicate_url", f"same URL as line {first_line[url]}", "list",
                                               line, url, batch.column("caption")[i].as_py()))
                    reading.example("duplicate_url", f"line {line}: same URL as line {first_line[url]}")
                else:
                    first_line[url] = line
            position += batch.num_rows
            writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
            kept += int(keep.sum())
    os.replace(f"{urls_path}.tmp", urls_path)
    os.remove(candidates)
    merged_counts = R.write(rejects_path, R.merged_by_line(R.read(first_rejects), duplicates))
    counts.clear()
    counts.update(merged_counts)
    os.remove(first_rejects)
    return kept
