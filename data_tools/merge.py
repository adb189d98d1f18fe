"""Join finished parts into one dataset: ``index.json`` through streaming's
``merge_index``, one ``manifest.parquet``, a summed ``stats.json`` and ``rejects.jsonl``.

Idempotent: it reads only complete parts, so it can run after every conversion, after
the last array task (``albef-data merge OUT``), or again after a resumed run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter

import pyarrow.parquet as pq

from data_tools.writer import MANIFEST_SCHEMA, add_stats, empty_stats, is_complete_part

#: rejects listed per reason in the merged rejects.jsonl (counts in stats.json are exact).
REJECT_SAMPLES_PER_REASON = 100


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

    listed: Counter = Counter()
    tmp = os.path.join(out_dir, ".rejects.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for p in parts:
            with open(os.path.join(p, "stats.json"), encoding="utf-8") as f:
                s = json.load(f)
            add_stats(stats, s)
            with open(os.path.join(p, "rejects.jsonl"), encoding="utf-8") as f:
                for line in f:
                    reason = json.loads(line)["reason"]
                    listed[reason] += 1
                    if listed[reason] <= REJECT_SAMPLES_PER_REASON:
                        out.write(line)
    os.replace(tmp, os.path.join(out_dir, "rejects.jsonl"))
    stats["parts"] = len(parts)
    stats["kept_per_source"] = dict(sorted(per_source.items()))
    tmp = os.path.join(out_dir, ".stats.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "stats.json"))
    if not quiet:
        print(f"merged {len(parts)} parts in {out_dir}: kept {stats['kept']} of {stats['read']} "
              f"read; skipped {_skips(stats)}")
    return stats


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
