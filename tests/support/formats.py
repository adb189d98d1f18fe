"""Small input fixtures in every layout `albef-data convert` reads, each returning the
pairs that must come out: {source/key: (sha1 of image bytes, caption)}."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg(seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small image unique to ``seed`` (random pixels, so no two seeds share bytes)."""
    rng = random.Random(seed)
    w = size + seed % 7
    im = Image.frombytes("RGB", (w, size), rng.randbytes(w * size * 3))
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=90) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


def sha1(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()


def write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def img2dataset_webdataset(root: str, n_shards: int = 2, per_shard: int = 6, seed: int = 0) -> dict:
    """``{shard:05d}.tar`` + ``{shard}.parquet`` + ``{shard}_stats.json``, as img2dataset
    writes them: zero-padded keys shard*10^k + row, failed rows leave gaps (in the parquet
    only), members in download-finish order (not key order)."""
    os.makedirs(root, exist_ok=True)
    expected, rng = {}, random.Random(seed)
    source = os.path.basename(root)
    for s in range(n_shards):
        rows = list(range(per_shard))
        failed = {rows[-1]}  # last row of each shard failed to download
        order = [r for r in rows if r not in failed]
        rng.shuffle(order)
        meta = []
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for r in order:
                key = f"{s * 10 + r:09d}"
                img = jpeg(seed * 1000 + s * 100 + r)
                cap = f"a photo number {s}-{r} of a dog é"
                _tar_add(tar, f"{key}.jpg", img)
                _tar_add(tar, f"{key}.txt", cap.encode())
                _tar_add(tar, f"{key}.json", json.dumps({"caption": cap, "key": key, "status": "success",
                                                         "url": f"http://x/{key}.jpg"}).encode())
                expected[f"{source}/{key}"] = (sha1(img), cap)
        for r in rows:
            key = f"{s * 10 + r:09d}"
            meta.append({"key": key, "caption": "c", "url": f"http://x/{key}.jpg",
                         "status": "failed_to_download" if r in failed else "success",
                         "error_message": "404" if r in failed else None})
        pq.write_table(pa.Table.from_pylist(meta), os.path.join(root, f"{s:05d}.parquet"))
        with open(os.path.join(root, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard - 1}, f)
    return expected


def img2dataset_parquet(root: str, n: int = 9, seed: int = 1) -> tuple[dict, int]:
    """img2dataset's parquet output: image in a binary ``jpg`` column (null when the download
    failed), ``caption``, ``key``, ``status``. Returns (expected, failed count)."""
    os.makedirs(root, exist_ok=True)
    source = os.path.basename(root)
    rows, expected, failed = [], {}, 0
    for r in range(n):
        key = f"{r:09d}"
        ok = r % 4 != 3
        img = jpeg(seed * 1000 + r) if ok else None
        cap = f"parquet caption {r}"
        rows.append({"key": key, "caption": cap, "jpg": img, "url": f"http://x/{r}",
                     "status": "success" if ok else "failed_to_download", "width": 24, "height": 24})
        if ok:
            expected[f"{source}/{key}"] = (sha1(img), cap)
        else:
            failed += 1
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("jpg", pa.binary()),
                        ("url", pa.string()), ("status", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(root, "00000.parquet"),
                   row_group_size=4)
    return expected, failed


def img2dataset_files(root: str, n: int = 7, seed: int = 2) -> dict:
    source = os.path.basename(root)
    expected = {}
    for r in range(n):
        shard = f"{r // 4:05d}"
        key = f"{r:09d}"
        img = jpeg(seed * 1000 + r)
        cap = f"files caption {r}"
        write_file(os.path.join(root, shard, f"{key}.jpg"), img)
        write_file(os.path.join(root, shard, f"{key}.txt"), cap.encode())
        write_file(os.path.join(root, shard, f"{key}.json"), json.dumps({"caption": cap}).encode())
        expected[f"{source}/{key}"] = (sha1(img), cap)
    return expected


def caption_tsv(path: str, image_root: str, n: int = 8, seed: int = 3, cc12m: bool = False) -> dict:
    """CC3M-style ``caption<TAB>path`` (or CC12M ``path<TAB>caption``), no header."""
    source = os.path.splitext(os.path.basename(path))[0]
    expected, lines = {}, []
    for r in range(n):
        img = jpeg(seed * 1000 + r, fmt="PNG" if r % 2 else "JPEG")
        rel = f"img/{r}.{'png' if r % 2 else 'jpg'}"
        write_file(os.path.join(image_root, rel), img)
        cap = f"tsv caption {r}, with a comma"
        lines.append(f"{rel}\t{cap}" if cc12m else f"{cap}\t{rel}")
        expected[f"{source}/{r:09d}"] = (sha1(img), cap)
    write_file(path, ("\n".join(lines) + "\n").encode())
    return expected


def coco_json(path: str, n_images: int = 4, seed: int = 4) -> dict:
    """ALBEF/COCO-style list: caption as a list (one pair each) or a single string."""
    root = os.path.dirname(path)
    source = os.path.splitext(os.path.basename(path))[0]
    entries, expected = [], {}
    for i in range(n_images):
        img = jpeg(seed * 1000 + i)
        rel = f"coco_images/{i:012d}.jpg"
        write_file(os.path.join(root, rel), img)
        if i % 2:
            caps = [f"coco image {i} caption {j}" for j in range(3)]
            for j, c in enumerate(caps):
                expected[f"{source}/{i}_{j}"] = (sha1(img), c)
        else:
            caps = f"coco image {i} single caption"
            expected[f"{source}/{i}"] = (sha1(img), caps)
        entries.append({"image": rel, "caption": caps, "image_id": i})
    write_file(path, json.dumps(entries).encode())
    return expected


def bytes_parquet(path: str, n: int = 10, seed: int = 5, hf_struct: bool = False,
                  row_group_size: int = 4) -> dict:
    """A table with a binary image column, or HF's {bytes, path} struct (some rows with only a
    path, relative to the file's folder)."""
    source = os.path.splitext(os.path.basename(path))[0]
    root = os.path.dirname(path)
    images, caps, expected = [], [], {}
    for r in range(n):
        img = jpeg(seed * 1000 + r)
        cap = f"table caption {r}"
        if hf_struct:
            if r % 3 == 2:  # path only, bytes null
                rel = f"hf_images/{r}.jpg"
                write_file(os.path.join(root, rel), img)
                images.append({"bytes": None, "path": rel})
            else:
                images.append({"bytes": img, "path": f"{r}.jpg"})
        else:
            images.append(img)
        caps.append(cap)
        expected[f"{source}/{source}/{r:09d}"] = (sha1(img), cap)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if hf_struct else pa.binary()
    table = pa.table({"image": pa.array(images, type=img_type), "caption": caps})
    os.makedirs(root, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return expected


def read_dataset(out: str) -> tuple[dict, list]:
    """The converted pairs {key: (sha1 of stored image bytes, caption)} and the list of all
    keys (to count duplicates), read back through streaming's own reader."""
    from streaming import LocalDataset

    ds = LocalDataset(local=out)
    got, keys = {}, []
    for i in range(len(ds)):
        s = ds[i]
        keys.append(s["key"])
        got[s["key"]] = (sha1(s["image"]), s["caption"])
    return got, keys
