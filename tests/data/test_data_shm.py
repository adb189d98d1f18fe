"""albef_ds.data.shm: a run reclaims the shared memory its own dead job left, nothing else."""
import json
import subprocess
import sys

import pytest
from streaming.base.constant import SHM_TO_CLEAN
from streaming.base.shared.prefix import _pack_locals

from albef_ds.data import shm

pytestmark = pytest.mark.slow


def _segments(shm_dir, prefix, locals_):
    for name in SHM_TO_CLEAN:
        (shm_dir / f"{prefix:06}_{name}").write_bytes(_pack_locals(locals_, prefix) if name == "locals" else b"x")


def _record(path, **changes):
    """Rewrite a record as a dead (or other) job would have left it."""
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))
    return path


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_reclaim_removes_only_the_dead_jobs_own_prefix(tmp_path, monkeypatch):
    shm_dir, locks, run = tmp_path / "shm", tmp_path / "tmp", tmp_path / "run"
    shm_dir.mkdir(), locks.mkdir()
    _segments(shm_dir, 5, ["/data/cc3m"])           # this run's dead job
    _segments(shm_dir, 6, ["/data/cc3m"])           # another live job of the same user, same data
    for prefix in (5, 6):
        for lock in ("barrier_filelock", "cache_filelock"):
            (locks / f"{prefix:06}_{lock}").write_text("")
    dead_mp = tmp_path / "pymp-deadjob"
    dead_mp.mkdir()
    _record(shm.write_record(run, 5, ["/data/cc3m"], str(locks)), pid=_dead_pid(), mp_temp_dir=str(dead_mp))
    removed = shm.reclaim(run, shm_dir=shm_dir)
    assert sorted(p.name for p in shm_dir.iterdir()) == sorted(f"000006_{n}" for n in SHM_TO_CLEAN)
    assert sorted(p.name for p in locks.iterdir()) == ["000006_barrier_filelock", "000006_cache_filelock"]
    assert not dead_mp.exists()
    assert len(removed) == len(SHM_TO_CLEAN) + 3 and not list((run / ".shm").glob("*.json"))


def test_reclaim_leaves_a_live_process_and_other_directories_alone(tmp_path):
    shm_dir, run = tmp_path / "shm", tmp_path / "run"
    shm_dir.mkdir()
    # The recorded process is alive (a sleeping child): nothing is touched.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _segments(shm_dir, 2, ["/data/a"])
        path = _record(shm.write_record(run, 2, ["/data/a"], str(tmp_path)), pid=child.pid, mp_temp_dir=None)
        assert shm.reclaim(run, shm_dir=shm_dir) == [] and len(list(shm_dir.iterdir())) == len(SHM_TO_CLEAN)
    finally:
        child.kill()
        child.wait()
    # The prefix now describes other local directories (another job took it): left alone.
    for f in shm_dir.iterdir():
        f.unlink()
    _segments(shm_dir, 2, ["/data/other"])
    _record(path, pid=_dead_pid())
    shm.reclaim(run, shm_dir=shm_dir)
    assert len(list(shm_dir.iterdir())) == len(SHM_TO_CLEAN)
