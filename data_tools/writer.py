"""The one shard writer every command uses (convert, synth): checked pairs in, a finished
*part* folder out.

A part is one unit of work: ``OUT/<name>/`` holding MDS shards and their ``index.json``
(written by ``streaming.MDSWriter``), ``manifest.parquet`` (one row per kept pair),
``stats.json`` (read / kept / skipped per reason), ``rejects.jsonl`` (every rejected row,
data_tools/rejects.py) and, with ``also_parquet``, ``pairs.parquet`` (image bytes + caption).
Everything is written into a hidden temporary folder and renamed into place only when
complete, so a part either exists whole or not at all: that is what makes conversion
resumable and a killed run free of duplicates.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from data_tools import rejects
from data_tools.records import REASONS, Pair, Reject

#: MDS columns. ``bytes`` keeps the encoded file unchanged (SYSTEMS_FACTS: ``jpeg`` would
#: re-encode, ``pil`` stores raw pixels).
MDS_COLUMNS = {"image": "bytes", "caption": "str", "source": "str", "key": "str",
               "width": "int32", "height": "int32", "image_id": "int64"}

MANIFEST_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("shard", pa.string()),
                             ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                             ("bytes", pa.int64()), ("sha1", pa.string()), ("image_id", pa.int64())])

PAIRS_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                          ("source", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                          ("image_id", pa.int64())])

#: rows per row group of pairs.parquet (the issue: about 1,000).
PARQUET_ROW_GROUP = 1000
#: MDS shard size; SYSTEMS_FACTS: 50-100 MB shards are the advice.
DEFAULT_SHARD_SIZE = "64mb"

FINAL_FILES = ("index.json", "manifest.parquet", "stats.json", "rejects.jsonl")


def empty_stats() -> dict:
    return {"read": 0, "kept": 0, "skipped": {r: 0 for r in REASONS}}


def add_stats(total: dict, part: dict) -> None:
    """Add one part's read / kept / skipped counts into ``total``."""
    total["read"] += part["read"]
    total["kept"] += part["kept"]
    for reason, n in part["skipped"].items():
        total["skipped"][reason] = total["skipped"].get(reason, 0) + n


class PartWriter:
    """Write one part; ``commit()`` renames it into place, ``abort()`` removes it."""

    def __init__(self, out_dir: str, name: str, compression: Optional[str] = None,
                 shard_size: str = DEFAULT_SHARD_SIZE, also_parquet: bool = False):
        from streaming import MDSWriter  # imported here: `albef-data --help` stays fast

        self.final = os.path.join(out_dir, name)
        self.tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.name = name
        self.mds = MDSWriter(out=self.tmp, columns=MDS_COLUMNS, compression=compression,
                             size_limit=shard_size)
        self.stats = empty_stats()
        # every reject of the part (one unit: 10,000 rows by default), for the rejects file
        self.rejects: list[dict] = []
        self.manifest: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
        self._pairs_path = self.tmp + ".pairs.parquet" if also_parquet else None
        self._pairs_writer = None
        self._pairs_buf: list[Pair] = []

    # ------------------------------------------------------------------ adding rows
    def add(self, item: Pair | Reject) -> None:
        self.stats["read"] += 1
        if isinstance(item, Reject):
            self.stats["skipped"][item.reason] = self.stats["skipped"].get(item.reason, 0) + 1
            self.rejects.append(item.to_dict())
            return
        self.stats["kept"] += 1
        self.mds.write({"image": item.image, "caption": item.caption, "source": item.source,
                        "key": item.key, "width": item.width, "height": item.height,
                        "image_id": item.image_id})
        m = self.manifest
        m["key"].append(item.key)
        m["source"].append(item.source)
        # MDSWriter flushes a full shard *before* caching the new sample, so after write()
        # the sample sits in the open shard, numbered len(shards); named at commit().
        m["shard"].append(len(self.mds.shards))
        m["caption"].append(item.caption)
        m["width"].append(item.width)
        m["height"].append(item.height)
        m["bytes"].append(len(item.image))
        m["sha1"].append(item.sha1)
        m["image_id"].append(item.image_id)
        if self._pairs_path:
            self._pairs_buf.append(item)
            if len(self._pairs_buf) >= PARQUET_ROW_GROUP:
                self._flush_pairs()

    def add_all(self, items: Iterable[Pair | Reject]) -> None:
        for item in items:
            self.add(item)

    def _flush_pairs(self) -> None:
        if not self._pairs_buf:
            return
        b = self._pairs_buf
        table = pa.table({"key": [p.key for p in b], "image": [p.image for p in b],
                          "caption": [p.caption for p in b], "source": [p.source for p in b],
                          "width": [p.width for p in b], "height": [p.height for p in b],
                          "image_id": [p.image_id for p in b]}, schema=PAIRS_SCHEMA)
        if self._pairs_writer is None:
            self._pairs_writer = pq.ParquetWriter(self._pairs_path, PAIRS_SCHEMA)
        self._pairs_writer.write_table(table, row_group_size=PARQUET_ROW_GROUP)
        self._pairs_buf = []

    # ------------------------------------------------------------------ finishing
    def commit(self) -> dict:
        """Finish the shards, write the part's side files, rename into place; returns stats."""
        self.mds.finish()
        with open(os.path.join(self.tmp, "index.json"), encoding="utf-8") as f:
            shards = json.load(f)["shards"]
        names = [(s.get("zip_data") or s["raw_data"])["basename"] for s in shards]
        self.manifest["shard"] = [f"{self.name}/{names[i]}" for i in self.manifest["shard"]]
        pq.write_table(pa.table(self.manifest, schema=MANIFEST_SCHEMA),
                       os.path.join(self.tmp, "manifest.parquet"))
        if self._pairs_path:
            self._flush_pairs()
            if self._pairs_writer is not None:
                self._pairs_writer.close()
                os.replace(self._pairs_path, os.path.join(self.tmp, "pairs.parquet"))
        # In line order (a tar's samples are in download-finish order), so that the merge can
        # interleave them with the download's rejects in one pass.
        rejects.write(os.path.join(self.tmp, rejects.FILE_NAME), sorted(self.rejects, key=rejects.line_key))
        with open(os.path.join(self.tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(self.stats, f, indent=1)
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            # Another process (an orphan of a killed run) finished this part first: its copy
            # is complete and identical in content; drop ours so no pair is written twice.
            if os.path.exists(os.path.join(self.final, "stats.json")):
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                raise
        return self.stats

    def abort(self) -> None:
        try:
            self.mds.finish()
        except Exception:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._pairs_path and os.path.exists(self._pairs_path):
            os.remove(self._pairs_path)


def is_complete_part(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.exists(os.path.join(path, f)) for f in FINAL_FILES)
