"""slurm/submit-convert.sh on the local cluster: a 3-task convert array (slurm/convert.sbatch)
plus the merge (slurm/merge.sbatch, --dependency=afterok on the array) give the same pairs
as one plain conversion."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.support.slurm import REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(300)]


def _write_json_input(root, n=30):
    """n small distinct JPEGs and a COCO/ALBEF-style JSON list of (image, caption)."""
    os.makedirs(root / "img")
    entries = []
    for i in range(n):
        rng = random.Random(i)
        im = Image.new("RGB", (20 + i % 5, 16))
        im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                    for _ in range(im.width * im.height)])
        im.save(root / "img" / f"{i}.jpg", quality=90)
        entries.append({"image": f"img/{i}.jpg", "caption": f"picture number {i}", "image_id": i})
    (root / "pairs.json").write_text(json.dumps(entries))
    return root / "pairs.json"


def _manifest(out):
    import pyarrow.parquet as pq
    t = pq.read_table(out / "manifest.parquet")
    return sorted(zip(t.column("key").to_pylist(), t.column("sha1").to_pylist(),
                      t.column("caption").to_pylist()))


def _index_samples(out):
    index = json.loads((out / "index.json").read_text())
    return sum(s["samples"] for s in index["shards"])


def test_convert_array_then_merge_equals_one_conversion(slurm_cluster, tmp_path):
    c = slurm_cluster
    src = _write_json_input(tmp_path / "in")
    convert_opts = ["--input-format", "json", "--rows-per-unit", "4"]  # 30 rows -> 8 units

    # the reference: one plain conversion, run here while the array runs on the cluster
    one = tmp_path / "one"
    ref = subprocess.Popen([sys.executable, "-m", "data_tools.cli", "convert", str(src), "--out", str(one),
                            *convert_opts, "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)

    arr = tmp_path / "arr"
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + c.env.get("PATH", ""),
           "OMP_NUM_THREADS": "1"}  # albef-data of this interpreter's environment
    sub = c.run("bash", str(REPO / "slurm" / "submit-convert.sh"), "--out", str(arr), "--tasks", "3",
                "--cpus-per-task", "1", "--workers", "1", "--input-format", "json", str(src),
                "--", "--rows-per-unit", "4", env=env, cwd=tmp_path)
    array_id = re.search(r"^ARRAY_JOB_ID=(\d+)$", sub.stdout, re.M).group(1)
    merge_id = re.search(r"^MERGE_JOB_ID=(\d+)$", sub.stdout, re.M).group(1)
    merge_info = c.job_info(merge_id)
    assert merge_info["Dependency"].startswith(f"afterok:{array_id}"), merge_info
    assert merge_info["JobState"] == "PENDING"

    info = c.wait_job(merge_id, timeout=240)
    logs = tmp_path / "arr.logs"
    log_text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.iterdir()))
    tasks = c.jobs_info(array_id)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"], tasks
    assert all(t["JobState"] == "COMPLETED" for t in tasks), (tasks, log_text)
    assert info["JobState"] == "COMPLETED", (info, log_text)
    for i in range(3):
        assert re.search(rf"task {i} of 3\b", log_text), log_text
        assert re.search(rf"task {i}/3: converted \d+ units", log_text), log_text
    assert "merged 8 parts" in log_text, log_text

    ref_out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_out
    assert _manifest(arr) == _manifest(one)
    keys = [k for k, _, _ in _manifest(arr)]
    assert len(keys) == len(set(keys)) == 30
    assert _index_samples(arr) == _index_samples(one) == 30
    stats = json.loads((arr / "stats.json").read_text())
    assert stats["kept"] == 30 and stats["parts"] == 8, stats
