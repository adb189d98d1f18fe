"""Bad input is counted by reason, exactly; the run goes on and exits 0; rejects are listed."""
import json
import os
import subprocess
import sys

import dt_fixtures as F


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
