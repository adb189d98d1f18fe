"""The converter's memory is bounded: its peak RSS on a 100,000-row Parquet input is within
a small margin of its peak on 10,000 rows (inputs are read in record batches, parts and
the merge stream through files)."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

import pytest

import tests.support.formats as F

pytestmark = pytest.mark.slow

#: allowed growth of peak RSS from 10k to 100k rows. Everything that grows with the input
#: (images, captions, manifest rows) would add well over this: 90k extra rows of ~0.9 KB
#: images alone are ~80 MB.
MARGIN_MB = 40

MEASURE = r"""
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"rc": rc, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write_parquet(path, rows):
    """LAION-style table: image bytes + caption, 1,000-row row groups (written streaming)."""
    images = [F.jpeg(i, size=16) for i in range(200)]
    schema = pa.schema([("image", pa.binary()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, 1000):
            n = min(1000, rows - start)
            w.write_table(pa.table({"image": [images[(start + i) % 200] for i in range(n)],
                                    "caption": [f"caption of row {start + i}" for i in range(n)]}, schema=schema))


def peak_rss_mb(tmp_path, rows):
    src = tmp_path / f"laion_{rows}.parquet"
    write_parquet(str(src), rows)
    out = tmp_path / f"out_{rows}"
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "data_tools.cli", "convert", str(src),
           "--out", str(out), "--no-progress", "--workers", "1"]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == rows
    return result["maxrss_kb"] / 1024


def test_peak_rss_100k_rows_within_margin_of_10k(tmp_path):
    small = peak_rss_mb(tmp_path, 10_000)
    large = peak_rss_mb(tmp_path, 100_000)
    print(f"converter peak RSS: 10k rows {small:.0f} MB, 100k rows {large:.0f} MB")
    assert large - small < MARGIN_MB, f"peak RSS grew from {small:.0f} MB to {large:.0f} MB"
