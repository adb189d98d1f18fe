"""Fixtures shared by every test package: synth data and the CLI run as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared_runs import DEMO_STEPS, LAUNCH_VARS, run_albef

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A short ``albef-ds demo`` (2,000 synth pairs, 300 steps, 100 test images): (its
    folder, its stdout, its retrieval.json). The demo test checks it; the fine-tuning tests
    start from it (a demo-sized pretrained checkpoint)."""
    import json
    out = tmp_path_factory.mktemp("demo")
    stdout = run_albef(["demo", "--out", str(out), "--train-pairs", "2000", "--test-images", "100",
                        "--steps", str(DEMO_STEPS), "--set", "logging.progress_bar=false"])
    return out, stdout, json.loads((out / "run" / "retrieval.json").read_text())


@pytest.fixture(autouse=True)
def no_launch_env_leaks():
    """A test that starts a process group in the pytest process (init_distributed) leaves
    RANK, WORLD_SIZE and MASTER_PORT in os.environ, that port held by its TCPStore: every
    later subprocess would inherit them, take itself for rank 0 of that world and fail to
    bind the port (EADDRINUSE, seen in CI). Each test's launch variables are put back. The
    group itself stays: DeepSpeed caches groups made from it, and later in-process tests
    reuse it (destroying it breaks them: "Group ... is not registered")."""
    before = {name: os.environ.get(name) for name in LAUNCH_VARS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


#: whole files of multi-rank, SLURM and end-to-end runs (minutes each): outside the fast lane
SLOW_FILES = {
    "slurm/test_convert_array.py", "slurm/test_local_cluster.py", "slurm/test_pretrain_sbatch.py",
    "slurm/test_shared_node.py", "train/test_pretrain.py", "train/test_distributed.py",
    "train/test_scale_out.py", "train/test_failure_paths.py", "cli/test_demo.py", "data/test_data_ranks.py",
    "data/test_data_partition.py", "data/test_data_shm.py", "data_tools/test_dt_memory.py",
    "objectives/test_tasks_end_to_end.py", "train/test_task_runs.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-rank, SLURM or end-to-end; skipped by the fast lane "
                                       "(pytest -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(tests_dir).as_posix()
        if rel in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
