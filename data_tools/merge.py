"""Join finished parts into one dataset: ``index.json`` through streaming's
``merge_index``, one ``manifest.parquet``, a summed ``stats.json`` and ``rejects.jsonl``.

When an input of the conversion (``plan.json``) is a folder written by ``albef-data
download``, its rejects (the URL list's refused rows and the failed downloads) join the
parts' in ``rejects.jsonl``, in line order for a single such input, and the list's lines
are accounted for: header + pairs written + rejected at any stage (``stats.json``'s
``url_lists``, printed).

Idempotent: it reads only complete parts, so it can run after every conversion, after
the last array task (``albef-data merge OUT``), or again after a resumed run.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq

from data_tools import rejects as R
from data_tools.writer import MANIFEST_SCHEMA, add_stats, empty_stats, is_complete_part


def list_parts(out_dir: str) -> list[str]:
    return sorted(e.path for e in os.scandir(out_dir)
                  if not e.name.startswith(".") and is_complete_part(e.path))


def merge(out_dir: str, quiet: bool = False) -> dict:
    """Merge every complete part under ``out_dir``; returns the summed stats."""
    from streaming.base.util import merge_index

    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"no such dataset folder: {out_dir}")
    parts = list_parts(out_dir)
    if not parts:
        raise FileNotFoundError(f"no finished parts in {out_dir}")
    # Parts are direct children of out_dir: merge_index prefixes each shard with the name
    # of the folder holding its index.json, exactly one level.
    # merge_index refuses to replace an index.json (a re-merge after a resumed run): set the
    # old one aside and restore it if the merge fails.
    index, old = os.path.join(out_dir, "index.json"), os.path.join(out_dir, ".index.json.old")
    if os.path.exists(index):
        os.replace(index, old)
    try:
        with _quiet_logging():  # merge_index warns about its temp folder and the non-empty out
            merge_index([os.path.join(p, "index.json") for p in parts], out_dir)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(index):
            os.replace(old, index)
        raise
    if os.path.exists(old):
        os.remove(old)

    stats, per_source = empty_stats(), Counter()
    tmp = os.path.join(out_dir, ".manifest.parquet.tmp")
    with pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as w:
        for p in parts:
            table = pq.read_table(os.path.join(p, "manifest.parquet"), schema=MANIFEST_SCHEMA)
            w.write_table(table)
            per_source.update(table.column("source").to_pylist())
    os.replace(tmp, os.path.join(out_dir, "manifest.parquet"))

    for p in parts:
        with open(os.path.join(p, "stats.json"), encoding="utf-8") as f:
            add_stats(stats, json.load(f))
    downloads = downloaded_inputs(out_dir)
    rejects_path = os.path.join(out_dir, R.FILE_NAME)
    converted_rejects: Counter = Counter()  # (source, reason) of the parts' rejects
    part_rows = _counted((row for p in parts for row in R.read(os.path.join(p, R.FILE_NAME))),
                         converted_rejects)
    if len(downloads) == 1 and downloads[0]["only_input"]:
        rows = R.merged_by_line(_download_rows(downloads[0]), part_rows)
    else:  # several lists: each one's rows in its line order, then what convert rejected
        rows = itertools.chain(*(_download_rows(d) for d in downloads), part_rows)
    by_reason = R.write(rejects_path, rows)
    # the path relative to the dataset folder: a moved or copied dataset still names its own file
    stats["rejects"] = {"path": R.FILE_NAME, "rows": sum(by_reason.values()),
                        "by_reason": dict(by_reason.most_common())}
    if downloads:
        stats["url_lists"] = [_accounting(d, per_source, converted_rejects, rejects_path)
                              for d in downloads]
    stats["parts"] = len(parts)
    stats["kept_per_source"] = dict(sorted(per_source.items()))
    tmp = os.path.join(out_dir, ".stats.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "stats.json"))
    if not quiet:
        listed = f", each listed in {rejects_path}" if stats["kept"] < stats["read"] else ""
        print(f"merged {len(parts)} parts in {out_dir}: kept {stats['kept']} of {stats['read']} "
              f"read; skipped {_skips(stats)}{listed}")
        for d in stats.get("url_lists", []):
            print(f"URL list {d['path']}: {d['accounting']}")
    return stats


def downloaded_inputs(out_dir: str) -> list[dict]:
    """The conversion's inputs (``plan.json``) that ``albef-data download`` wrote: folder,
    source name (what the parts' rows carry), its summary, and whether it is the only input."""
    from data_tools.download import download_summary
    from data_tools.records import source_name

    path = os.path.join(out_dir, "plan.json")
    if not os.path.exists(path):  # synth writes parts without a plan
        return []
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    names = [plan.get("reader", {}).get("source") or source_name(p) for p in plan["inputs"]]
    found = []
    for folder, name in zip(plan["inputs"], names):
        summary = download_summary(folder) if os.path.isdir(folder) else None
        if summary is not None:
            found.append({"folder": folder, "source": name, "summary": summary,
                          "only_input": len(plan["inputs"]) == 1, "own_source": names.count(name) == 1})
    return found


def _download_rows(download: dict) -> Iterator[dict]:
    """The download's rejects (its folder's rejects.jsonl), each named with the source."""
    path = os.path.join(download["folder"], R.FILE_NAME)
    if os.path.exists(path):
        for row in R.read(path):
            row.setdefault("source", download["source"])
            yield row


def _counted(rows: Iterable[dict], counts: Counter) -> Iterator[dict]:
    for row in rows:
        counts[row.get("source", ""), row["reason"]] += 1
        yield row


def _accounting(download: dict, kept_per_source: Counter, converted_rejects: Counter,
                rejects_path: str) -> dict:
    """A download input's list, line by line: header + pairs written + rejected at each stage."""
    listed = download["summary"]["list"]
    source = download["source"]
    rejected = Counter(download["summary"]["rejects"]["by_reason"])
    for (row_source, reason), n in converted_rejects.items():
        if row_source == source:
            rejected[reason] += n
    out = {"path": download["summary"].get("url_list", download["folder"]), "images": download["folder"],
           "unit": listed["unit"], "lines": listed["lines"], "header": listed["header"],
           "pairs": kept_per_source.get(source, 0), "rejected": dict(rejected.most_common())}
    if download["own_source"]:
        out["accounting"] = R.accounting_line(out["unit"], out["lines"], out["header"], out["pairs"],
                                              "pairs written", rejected, rejects_path)
    else:  # another input has the same source name: its pairs cannot be told apart
        out["accounting"] = (f"{out['lines']} {out['unit']}; not accounted for here: another input has "
                             f"the source name {source!r} (give each its own --source)")
    return out


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    upload = logging.getLogger("streaming.base.storage.upload")
    old_upload = upload.level
    upload.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)
        upload.setLevel(old_upload)


def _skips(stats: dict) -> str:
    s = {k: v for k, v in stats["skipped"].items() if v}
    return ", ".join(f"{k} {v}" for k, v in s.items()) or "none"
