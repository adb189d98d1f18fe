"""Every input layout converts with every valid pair in the shards exactly once, with
identical image bytes and caption (read back through streaming's reader)."""
import json
import os

import pyarrow.parquet as pq
import pytest

import tests.support.formats as F
from data_tools.cli import main


def convert(inputs, out, *extra):
    return main(["convert", *map(str, inputs), "--out", str(out), "--no-progress", "--rows-per-unit", "3", *extra])


def check(out, expected):
    got, keys = F.read_dataset(str(out))
    assert len(keys) == len(set(keys)), "a pair was written twice"
    assert got == expected  # same keys, byte-identical images (sha1), identical captions
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pydict()
    assert sorted(manifest["key"]) == sorted(expected)
    assert {k: (s, c) for k, s, c in zip(manifest["key"], manifest["sha1"], manifest["caption"])} == expected
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["kept"] == len(expected)
    return stats


def test_img2dataset_webdataset_with_its_parquet_beside(tmp_path):
    expected = F.img2dataset_webdataset(str(tmp_path / "cc3m_wds"))
    assert convert([tmp_path / "cc3m_wds"], tmp_path / "out") == 0
    stats = check(tmp_path / "out", expected)
    assert stats["read"] == len(expected)  # the metadata parquet and _stats.json are not pairs


def test_img2dataset_parquet_output(tmp_path):
    expected, failed = F.img2dataset_parquet(str(tmp_path / "cc12m_pq"))
    assert convert([tmp_path / "cc12m_pq"], tmp_path / "out") == 0
    stats = check(tmp_path / "out", expected)
    assert stats["skipped"]["download_failed"] == failed > 0


def test_img2dataset_files_output(tmp_path):
    expected = F.img2dataset_files(str(tmp_path / "sbu_files"))
    assert convert([tmp_path / "sbu_files"], tmp_path / "out") == 0
    check(tmp_path / "out", expected)


def test_img2dataset_files_output_with_side_car_parquets_is_detected_as_files(tmp_path):
    """Numbered shard folders plus img2dataset's {shard}.parquet / {shard}_stats.json beside
    them: detected as `files` without --input-format (not as a Parquet table)."""
    import pyarrow as pa
    from data_tools.readers import detect_format
    root = tmp_path / "sbu_files"
    expected = F.img2dataset_files(str(root))  # 00000/ and 00001/
    for shard in ("00000", "00001"):
        rows = [{"key": k.split("/")[1], "caption": c, "url": "http://x", "status": "success"}
                for k, (_, c) in expected.items()]
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard}.parquet")
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    assert detect_format(str(root)) == "files"
    assert convert([root], tmp_path / "out") == 0
    stats = check(tmp_path / "out", expected)
    assert stats["read"] == len(expected)  # the side-cars are no samples


@pytest.mark.parametrize("cc12m", [False, True])
def test_caption_tsv_with_local_images(tmp_path, cc12m):
    expected = F.caption_tsv(str(tmp_path / "cc.tsv"), str(tmp_path), cc12m=cc12m)
    cols = ["--caption-col", "1", "--image-col", "0"] if cc12m else ["--caption-col", "0", "--image-col", "1"]
    assert convert([tmp_path / "cc.tsv"], tmp_path / "out", "--image-root", str(tmp_path), *cols) == 0
    check(tmp_path / "out", expected)


def test_csv_with_header_columns_by_name(tmp_path):
    F.write_file(str(tmp_path / "img" / "a.jpg"), F.jpeg(1))
    F.write_file(str(tmp_path / "img" / "b.jpg"), F.jpeg(2))
    (tmp_path / "list.csv").write_text('filepath,title\nimg/a.jpg,"a caption, quoted"\nimg/b.jpg,plain\n')
    assert convert([tmp_path / "list.csv"], tmp_path / "out", "--caption-col", "title", "--image-col", "filepath") == 0
    check(tmp_path / "out", {"list/000000000": (F.sha1(F.jpeg(1)), "a caption, quoted"),
                             "list/000000001": (F.sha1(F.jpeg(2)), "plain")})


def test_coco_style_json(tmp_path):
    expected = F.coco_json(str(tmp_path / "coco.json"))
    assert convert([tmp_path / "coco.json"], tmp_path / "out") == 0
    check(tmp_path / "out", expected)


@pytest.mark.parametrize("hf_struct", [False, True])
def test_parquet_with_image_bytes(tmp_path, hf_struct):
    expected = F.bytes_parquet(str(tmp_path / "laion.parquet"), hf_struct=hf_struct)
    assert convert([tmp_path / "laion.parquet"], tmp_path / "out") == 0
    check(tmp_path / "out", expected)


def test_also_parquet_holds_the_same_pairs(tmp_path):
    expected = F.coco_json(str(tmp_path / "coco.json"))
    assert convert([tmp_path / "coco.json"], tmp_path / "out", "--also-parquet") == 0
    rows = {}
    for part in sorted((tmp_path / "out").glob("part-*/pairs.parquet")):
        t = pq.read_table(part).to_pydict()
        rows.update({k: (F.sha1(i), c) for k, i, c in zip(t["key"], t["image"], t["caption"])})
    assert rows == expected


def test_exclude_drops_eval_images_by_content(tmp_path):
    expected = F.coco_json(str(tmp_path / "coco.json"))
    # an "evaluation set" holding the bytes of image 1 under another name
    F.write_file(str(tmp_path / "eval" / "x.jpg"), F.jpeg(4 * 1000 + 1))
    (tmp_path / "eval" / "test.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["c"]}]))
    assert convert([tmp_path / "coco.json"], tmp_path / "out", "--exclude", str(tmp_path / "eval" / "test.json")) == 0
    dropped = {k for k in expected if k.startswith("coco/1_")}
    stats = check(tmp_path / "out", {k: v for k, v in expected.items() if k not in dropped})
    assert stats["skipped"]["excluded"] == len(dropped) == 3


def test_image_id_shared_by_duplicates_across_sources(tmp_path):
    F.write_file(str(tmp_path / "img" / "a.jpg"), F.jpeg(7))
    (tmp_path / "one.json").write_text(json.dumps([{"image": "img/a.jpg", "caption": "first"}]))
    (tmp_path / "two.json").write_text(json.dumps([{"image": "img/a.jpg", "caption": ["second", "third"]}]))
    assert convert([tmp_path / "one.json", tmp_path / "two.json"], tmp_path / "out") == 0
    ids = set(pq.read_table(tmp_path / "out" / "manifest.parquet").column("image_id").to_pylist())
    assert len(ids) == 1


def test_max_side_resizes(tmp_path):
    F.write_file(str(tmp_path / "img" / "big.png"), F.jpeg(3, size=120, fmt="PNG"))
    (tmp_path / "a.json").write_text(json.dumps([{"image": "img/big.png", "caption": "big"}]))
    assert convert([tmp_path / "a.json"], tmp_path / "out", "--max-side", "40") == 0
    m = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pydict()
    assert max(m["width"][0], m["height"][0]) == 40


def test_missing_input_or_unreadable_format_fails_naming_the_path(tmp_path, capsys):
    assert convert([tmp_path / "nope.tsv"], tmp_path / "out") == 2
    assert str(tmp_path / "nope.tsv") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "weird.xyz").write_text("hello")
    assert convert([tmp_path / "weird.xyz"], tmp_path / "out2") == 2
    assert "weird.xyz" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert convert([tmp_path / "bad.json"], tmp_path / "out3") == 2
    assert "bad.json" in capsys.readouterr().err
