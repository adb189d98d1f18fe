"""Helpers of the end-to-end tests, importable from any test package (tests/ is on
sys.path: tests/conftest.py lives there): the CLI run as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: what a launcher exports; the library's init_distributed writes them into os.environ too
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: pretraining steps of the short demo shared by the end-to-end tests (the ``demo`` fixture)
DEMO_STEPS = 300


def run_albef(argv, timeout=900, threads=1):
    """``python -m albef_ds ARGV``; its stdout (fails with the output)."""
    proc = subprocess.run([sys.executable, "-m", "albef_ds", *argv], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def synth_tasks(out: Path, num_train: int, num_val: int, num_test: int) -> Path:
    """``albef-data synth-tasks`` into ``out`` (the downstream tasks' synthetic JSON)."""
    subprocess.run([sys.executable, "-m", "data_tools.cli", "synth-tasks", "--out", str(out), "--num-train",
                    str(num_train), "--num-val", str(num_val), "--num-test", str(num_test), "--no-progress"],
                   cwd=REPO, check=True, capture_output=True)
    return out
