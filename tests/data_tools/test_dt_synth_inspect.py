"""synth is deterministic by seed (and by nothing else: not the worker count); its output
has the documented layout; inspect writes a PNG contact sheet."""
import hashlib
import json
import os

import pyarrow.parquet as pq
from PIL import Image

import dt_fixtures as F
from data_tools.cli import main


def synth(out, seed, workers=1, n=300):
    assert main(["synth", "--out", str(out), "--seed", str(seed), "--num-train", str(n), "--num-val", "6",
                 "--num-test", "10", "--captions-per-image", "5", "--image-size", "64",
                 "--workers", str(workers), "--no-progress"]) == 0


def fingerprint(out):
    """Hash of everything a consumer reads: pairs (key, image bytes, caption, image_id),
    the retrieval annotations, the eval images and captions.txt."""
    got, keys = F.read_dataset(str(out / "train"))
    h = hashlib.sha1(json.dumps(sorted(got.items())).encode())
    for name in ("val.json", "test.json", "captions.txt"):
        h.update((out / name).read_bytes())
    for img in sorted(os.listdir(out / "images")):
        h.update((out / "images" / img).read_bytes())
    return h.hexdigest()


def test_synth_deterministic_by_seed_and_layout(tmp_path):
    synth(tmp_path / "a", seed=7, workers=1)
    synth(tmp_path / "b", seed=7, workers=2)
    synth(tmp_path / "c", seed=8, workers=1)
    a = tmp_path / "a"
    assert fingerprint(a) == fingerprint(tmp_path / "b")
    assert fingerprint(a) != fingerprint(tmp_path / "c")

    # layout: MDS train with manifest and stats, retrieval JSON, images, captions.txt
    for f in ("train/index.json", "train/manifest.parquet", "train/stats.json", "val.json", "test.json",
              "captions.txt"):
        assert (a / f).exists(), f
    assert json.loads((a / "train" / "stats.json").read_text())["kept"] == 300
    test = json.loads((a / "test.json").read_text())
    assert len(test) == 10 and [e["image_id"] for e in test] == list(range(10))
    for e in test:
        assert len(e["caption"]) == 5 and len(set(e["caption"])) == 5  # distinct paraphrases
        im = Image.open(a / e["image"])
        assert im.size == (64, 64)
    assert len((a / "captions.txt").read_text().splitlines()) == 300
    m = pq.read_table(a / "train" / "manifest.parquet").to_pydict()
    assert len(set(m["image_id"])) == 300


def test_synth_captions_describe_the_picture(tmp_path):
    """Relations are true: in 'X to the left of Y' images, X's colour lies left of Y's."""
    from data_tools.synth import COLOURS, draw_example
    import io
    import numpy as np
    checked = 0
    for i in range(200):
        png, caps = draw_example(0, "train", i, 64)
        for c in caps:
            if " to the left of " not in c:
                continue
            left, right = c.split(" to the left of ")  # "a red circle" / "a blue square ..."
            lc, rc = left.split()[1], right.split()[1]
            if lc == rc:
                continue
            px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

            def mean_x(name):
                mask = np.abs(px - np.array(COLOURS[name])).sum(-1) < 30
                return np.nonzero(mask)[1].mean()
            assert mean_x(lc) < mean_x(rc), c
            checked += 1
    assert checked > 10


def test_inspect_writes_a_png(tmp_path, capsys):
    synth(tmp_path / "s", seed=1, n=40)
    png = tmp_path / "sheet.png"
    assert main(["inspect", str(tmp_path / "s" / "train"), "--png", str(png), "--samples", "12"]) == 0
    im = Image.open(png)
    assert im.format == "PNG" and im.width > 100 and im.height > 100
    out = capsys.readouterr().out
    assert "synth" in out and "caption length" in out
