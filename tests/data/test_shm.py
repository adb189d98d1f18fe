"""albef_ds/data/shm.py: what a failed job's local leader gives back."""
import os
import subprocess
import sys
import textwrap

from tests.support.launch import env

ATTACH_AND_RELEASE = textwrap.dedent("""
    import sys
    from streaming.base.shared.memory import SharedMemory
    from albef_ds.data import shm
    run_dir, name, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3])
    attached = SharedMemory(name=name, create=False, size=8)   # another rank made it
    shm.write_record(run_dir, prefix, [], "/tmp")
    shm.release(run_dir, failed=True)
    print("released")
""")


def test_a_failed_leader_removes_a_segment_another_rank_made_without_a_tracker_traceback(tmp_path):
    """Ranks race to create each streaming segment; the leader's release after a failure
    unlinks them all, and must not tell its resource tracker to forget one it never
    registered (the tracker prints a KeyError traceback at exit: a 2-rank refusal at
    start-up showed it now and then)."""
    from albef_ds.data.shm import SHM_DIR, _segment_names
    prefix = 900000 + os.getpid() % 99999
    name = _segment_names(prefix)[0]
    (SHM_DIR / name).write_bytes(bytes(8))
    try:
        proc = subprocess.run([sys.executable, "-c", ATTACH_AND_RELEASE, str(tmp_path), name, str(prefix)],
                              env=env(), capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and "released" in proc.stdout, proc.stdout + proc.stderr
        assert not (SHM_DIR / name).exists()
        assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr
    finally:
        (SHM_DIR / name).unlink(missing_ok=True)
