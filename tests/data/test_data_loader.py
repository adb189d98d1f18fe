"""The training loader's contract: batch shapes and dtypes, fixed padding, content-hash
image ids, mixing weights, errors naming missing paths, corrupt records skipped."""
import os

import pyarrow.parquet as pq
import pytest
import torch

from albef_ds.data import CLIP_MEAN, build_train_loader
from albef_ds.tokenizer import load_tokenizer
from data_tools.records import Pair, sha1_hex
from data_tools.merge import merge
from data_tools.writer import PartWriter
from tests.support.loaders import make_cfg


def test_batch_contract(synth_small):
    data, tok_dir = synth_small
    tok = load_tokenizer(tok_dir)
    loader = build_train_loader(make_cfg([data / "train"]), tok, 0, 1)
    manifest = pq.read_table(data / "train" / "manifest.parquet").to_pydict()
    ids = dict(zip(manifest["key"], manifest["image_id"]))
    n = 0
    for b in loader:
        assert list(b)[:5] == ["image", "text_ids", "text_mask", "image_id", "key"]
        assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["text_ids"].shape == (8, 16) and b["text_ids"].dtype == torch.int64  # always max_tokens
        assert b["text_mask"].shape == (8, 16) and b["text_mask"].dtype == torch.int64
        assert (b["text_ids"][:, 0] == tok.cls_token_id).all()
        assert ((b["text_ids"] == tok.pad_token_id) == (b["text_mask"] == 0)).all()
        assert b["image_id"].dtype == torch.int64
        assert b["image_id"].tolist() == [ids[k] for k in b["key"]]
        assert isinstance(b["key"], list) and all(isinstance(k, str) for k in b["key"])
        assert b["skipped"].sum() == 0
        n += 1
    assert n == 256 // 8
    # CLIP normalisation: a mid-grey background pixel (110/255) maps below 0 in every channel
    assert b["image"].mean() < 0.5 and b["image"].min() >= (0 - max(CLIP_MEAN)) / 0.26


def test_missing_train_dir_names_the_path(tmp_path, synth_small):
    _, tok_dir = synth_small
    missing = tmp_path / "no_such_shards"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_train_loader(make_cfg([missing]), load_tokenizer(tok_dir), 0, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_train_loader(make_cfg([empty]), load_tokenizer(tok_dir), 0, 1)


def _write_dataset(out, n, source, corrupt_at=()):
    """An MDS dataset written through the shard writer; records in corrupt_at hold junk bytes."""
    from PIL import Image
    import io
    os.makedirs(out, exist_ok=True)
    w = PartWriter(str(out), "part-000000")
    for i in range(n):
        if i in corrupt_at:
            img = b"\xff\xd8\xff\xe0 this is not a jpeg"
        else:
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (i * 7 % 255, 50, 90)).save(buf, format="PNG")
            img = buf.getvalue()
        w.add(Pair(key=f"{source}/{i}", source=source, caption=f"a {source} picture {i}", image=img,
                   width=20, height=20, sha1=sha1_hex(img)))
    w.commit()
    merge(str(out), quiet=True)


def test_corrupt_record_is_skipped_and_counted_not_a_crash(tmp_path, synth_small):
    _, tok_dir = synth_small
    _write_dataset(tmp_path / "bad", 32, "bad", corrupt_at={5})
    loader = build_train_loader(make_cfg([tmp_path / "bad"], shuffle=False), load_tokenizer(tok_dir), 0, 1)
    batches = list(loader)
    assert len(batches) == 4 and all(len(b["key"]) == 8 for b in batches)  # fixed batch size kept
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    keys = [k for b in batches for k in b["key"]]
    assert "bad/5" not in keys and keys.count("bad/6") == 2  # replaced by the next readable record


def test_mixing_weights_follow_the_config(tmp_path, synth_small):
    _, tok_dir = synth_small
    _write_dataset(tmp_path / "a", 64, "a")
    _write_dataset(tmp_path / "b", 64, "b")
    cfg = make_cfg([tmp_path / "a", tmp_path / "b"], batch=16, train_weights=[3.0, 1.0], randaugment=False)
    keys = [k for b in build_train_loader(cfg, load_tokenizer(tok_dir), 0, 1) for k in b["key"]]
    a = sum(k.startswith("a/") for k in keys)
    b = sum(k.startswith("b/") for k in keys)
    assert a + b == 128 and a == 96 and b == 32  # 3:1 of an epoch of 128 samples


def test_cache_dir_copies_shards_from_a_shared_path(tmp_path, synth_small):
    _, tok_dir = synth_small
    _write_dataset(tmp_path / "nfs", 32, "nfs")
    cache = tmp_path / "cache"
    cfg = make_cfg([tmp_path / "nfs"], cache_dir=str(cache), shuffle=False)
    keys = [k for b in build_train_loader(cfg, load_tokenizer(tok_dir), 0, 1) for k in b["key"]]
    assert sorted(keys) == sorted(f"nfs/{i}" for i in range(32))
    assert list(cache.glob("*/part-000000/shard.00000.mds"))  # read from the local copy
