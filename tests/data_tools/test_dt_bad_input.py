"""Bad input is counted by reason, exactly; the run goes on and exits 0; rejects are listed."""
import json
import os
import subprocess
import sys

import pytest

import tests.support.formats as F


@pytest.mark.slow
def test_bad_input_counted_per_reason_exit_0_rejects_listed(tmp_path):
    root = tmp_path / "cc3m"
    good = F.jpeg(1)
    F.write_file(str(root / "good0.jpg"), good)
    F.write_file(str(root / "good1.png"), F.jpeg(2, fmt="PNG"))
    F.write_file(str(root / "good2.jpg"), F.jpeg(3))
    F.write_file(str(root / "truncated.jpg"), good[: len(good) // 2])
    F.write_file(str(root / "zero.jpg"), b"")
    F.write_file(str(root / "garbage.jpg"), b"GIF89a but not really an image at all")
    lines = [
        b"a good caption\tgood0.jpg",                 # kept
        b"cut short\ttruncated.jpg",                  # corrupt_image (truncated)
        b"nothing inside\tzero.jpg",                  # empty_image
        b"gone\tdoes_not_exist.jpg",                  # missing_file
        b"caf\xe9 latin-1 is not utf-8\tgood1.png",   # bad_caption (undecodable)
        b"no tab in this row at all",                 # malformed_row
        b"another good one\tgood1.png",               # kept
        b"junk bytes\tgarbage.jpg",                   # corrupt_image
        b"   \tgood2.jpg",                            # bad_caption (empty)
        b"also gone\tmissing/sub/x.jpg",              # missing_file
        b"empty image column\t",                      # malformed_row
        b"last good caption\tgood2.jpg",              # kept
    ]
    (root / "cc3m.tsv").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "data_tools.cli", "convert", str(root / "cc3m.tsv"),
                           "--out", str(out), "--caption-col", "0", "--image-col", "1",
                           "--rows-per-unit", "5", "--workers", "2", "--no-progress"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # --no-progress hides the bar, not the summary that names the skip reasons
    said = proc.stdout + proc.stderr
    assert "merged 3 parts in" in said and ("kept 3 of 12 read; skipped missing_file 2, empty_image 1, "
                                            "corrupt_image 2, bad_caption 2, malformed_row 2") in said, said
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 12 and stats["kept"] == 3
    assert stats["skipped"] == {"missing_file": 2, "empty_image": 1, "corrupt_image": 2, "bad_caption": 2,
                                "malformed_row": 2, "download_failed": 0, "excluded": 0}
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["key"], r["reason"]) for r in rejects) == sorted([
        ("cc3m/000000001", "corrupt_image"), ("cc3m/000000002", "empty_image"),
        ("cc3m/000000003", "missing_file"), ("cc3m/000000004", "bad_caption"),
        ("cc3m/000000005", "malformed_row"), ("cc3m/000000007", "corrupt_image"),
        ("cc3m/000000008", "bad_caption"), ("cc3m/000000009", "missing_file"),
        ("cc3m/000000010", "malformed_row")])
    got, keys = F.read_dataset(str(out))
    assert sorted(keys) == ["cc3m/000000000", "cc3m/000000006", "cc3m/000000011"]


def _convert(inputs, out, *extra):
    from data_tools.cli import main
    return main(["convert", *map(str, inputs), "--out", str(out), "--no-progress", *extra])


def _rejects(out):
    return [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
@pytest.mark.parametrize("image_first", [False, True], ids=["caption-first", "image-first"])
def test_raw_tab_inside_a_tsv_caption_is_a_malformed_row(tmp_path, image_first, header):
    """A tab in the caption adds a field: the row is rejected naming it, in either column
    order, with or without a header; neither a cut caption nor caption words as a path."""
    for i in range(3):
        F.write_file(str(tmp_path / f"{i}.jpg"), F.jpeg(i))
    rows = [("a plain caption", "0.jpg"), ("two words\tafter a raw tab", "1.jpg"), ("another one", "2.jpg")]
    lines = [f"{img}\t{cap}" if image_first else f"{cap}\t{img}" for cap, img in rows]
    if header:
        lines.insert(0, "image\tcaption" if image_first else "caption\timage")
    (tmp_path / "cc.tsv").write_text("\n".join(lines) + "\n")
    cols = [] if header else (["--image-col", "0", "--caption-col", "1"] if image_first
                              else ["--caption-col", "0", "--image-col", "1"])
    out = tmp_path / "out"
    assert _convert([tmp_path / "cc.tsv"], out, "--header" if header else "--no-header", *cols) == 0
    got, _ = F.read_dataset(str(out))
    assert got == {"cc/000000000": (F.sha1(F.jpeg(0)), "a plain caption"),
                   "cc/000000002": (F.sha1(F.jpeg(2)), "another one")}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 3 and stats["skipped"]["malformed_row"] == 1
    (reject,) = _rejects(out)
    assert reject["reason"] == "malformed_row" and reject["key"] == "cc/000000001"
    line = 3 if header else 2
    assert f"row 1 (line {line} of {tmp_path / 'cc.tsv'})" in reject["detail"]
    assert "3 fields, expected 2" in reject["detail"]


def test_tsv_column_index_beyond_the_field_count_fails_at_once(tmp_path, capsys):
    F.write_file(str(tmp_path / "0.jpg"), F.jpeg(0))
    (tmp_path / "cc.tsv").write_text("a caption\t0.jpg\n")
    assert _convert([tmp_path / "cc.tsv"], tmp_path / "out", "--caption-col", "0", "--image-col", "2") == 2
    err = capsys.readouterr().err
    assert "cc.tsv" in err and "column index 2 is out of range" in err


def test_json_entry_with_an_empty_caption_list_is_counted_as_bad_caption(tmp_path):
    F.write_file(str(tmp_path / "img" / "a.jpg"), F.jpeg(1))
    F.write_file(str(tmp_path / "img" / "b.jpg"), F.jpeg(2))
    (tmp_path / "ann.json").write_text(json.dumps([
        {"image": "img/a.jpg", "caption": ["kept one", "kept two"]},
        {"image": "img/b.jpg", "caption": []},
    ]))
    out = tmp_path / "out"
    assert _convert([tmp_path / "ann.json"], out) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 3 and stats["kept"] == 2 and stats["skipped"]["bad_caption"] == 1
    (reject,) = _rejects(out)
    assert (reject["reason"], reject["key"]) == ("bad_caption", "ann/1")
    assert "entry 1: empty caption list" == reject["detail"]


def test_img2dataset_sample_without_image_is_missing_file_in_tars_and_folders(tmp_path):
    """Both img2dataset readers name a sample with a caption but no image the same way."""
    import io
    import tarfile
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("000000000.jpg", F.jpeg(0)), ("000000000.txt", b"whole sample"),
                           ("000000001.txt", b"caption, no image"), ("000000001.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = tmp_path / "files"
    F.write_file(str(files / "00000" / "000000000.jpg"), F.jpeg(0))
    F.write_file(str(files / "00000" / "000000000.txt"), b"whole sample")
    F.write_file(str(files / "00000" / "000000001.txt"), b"caption, no image")
    F.write_file(str(files / "00000" / "000000001.json"), b"{}")
    for fmt, given, source in (("webdataset", tmp_path / "00000.tar", "00000"), ("files", files, "files")):
        out = tmp_path / f"out_{fmt}"
        assert _convert([given], out, "--input-format", fmt) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["kept"] == 1 and stats["skipped"]["missing_file"] == 1, fmt
        assert stats["skipped"]["malformed_row"] == 0, fmt
        (reject,) = _rejects(out)
        assert reject["reason"] == "missing_file" and reject["key"] == f"{source}/000000001", fmt
        assert "sample 000000001 in " in reject["detail"] and "has no image" in reject["detail"], fmt
