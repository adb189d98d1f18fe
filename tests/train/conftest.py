import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """Synth shards (640 train pairs: a multiple of ranks x batch) and a vocabulary."""
    root = tmp_path_factory.mktemp("synth")
    data, tok = root / "data", root / "tok"
    run_cli(["albef-data", "synth", "--out", str(data), "--seed", "0", "--num-train", "640",
             "--num-val", "40", "--num-test", "40", "--no-progress"])
    run_cli(["albef-data", "build-vocab", str(data / "captions.txt"), "--out", str(tok), "--vocab-size", "300"])
    return data, tok


def run_cli(argv, **kw):
    exe = Path(sys.executable).parent / argv[0]
    proc = subprocess.run([str(exe)] + argv[1:], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
