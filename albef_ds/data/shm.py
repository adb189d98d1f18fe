"""The shared memory and lock files a run's data loader created, and only those.

Streaming names its shared memory ``<prefix>_<name>`` (``000003_barrier``, …) with the first
prefix free on the host, and its file locks ``<prefix>_barrier_filelock`` /
``<prefix>_cache_filelock`` in the temp dir. A hard-killed job leaves them behind; its
``clean_stale_shared_memory()`` unlinks every prefix on the host, live jobs' included (two
jobs of one user sharing a node). Instead each node's local leader records its prefix in
the run directory (``RUN_DIR/.shm/<host>.json``); the next job of the same run reclaims
exactly that, when the recorded process is gone and the segments still hold the same
local directories; a run that ends normally removes its lock files and its record.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def record_path(run_dir: str | os.PathLike, host: Optional[str] = None) -> Path:
    return Path(run_dir) / ".shm" / f"{host or socket.gethostname()}.json"


def _segment_names(prefix: int) -> list[str]:
    from streaming.base.constant import SHM_TO_CLEAN
    return [f"{prefix:06}_{name}" for name in SHM_TO_CLEAN]


def _lock_files(prefix: int, root: str) -> list[str]:
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    return [os.path.join(root, f"{prefix:06}_{name}") for name in (BARRIER_FILELOCK, CACHE_FILELOCK)]


def _locals_of(prefix: int, shm_dir: Path) -> Optional[list[str]]:
    """The local directories recorded in a live ``<prefix>_locals`` segment (None: absent)."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared.prefix import _unpack_locals
    path = shm_dir / f"{prefix:06}_{LOCALS}"
    try:
        return _unpack_locals(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_record(run_dir: str | os.PathLike, prefix: int, locals_: list[str], lock_root: str) -> Path:
    """Record this node's streaming prefix for the run (the node's local leader calls it)."""
    import multiprocessing.util
    path = record_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "prefix": prefix, "locals": locals_, "lock_root": lock_root,
              "mp_temp_dir": multiprocessing.util.get_temp_dir()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return path


def reclaim(run_dir: str | os.PathLike, shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove what a previous, dead job of this run left on this host; return the names
    removed. Nothing is touched when the recorded process still runs, or when the segments
    under the recorded prefix describe other local directories (another job's)."""
    path = record_path(run_dir)
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
    except ValueError:
        path.unlink(missing_ok=True)
        return []
    prefix = int(record["prefix"])
    if record.get("pid") != os.getpid() and _alive(int(record["pid"])):
        log.warning("shared memory prefix %06d of this run is held by live process %s: left alone",
                    prefix, record["pid"])
        return []
    removed = []
    if _locals_of(prefix, shm_dir) in (record.get("locals"), None):
        for name in _segment_names(prefix):
            try:
                (shm_dir / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
    for lock in _lock_files(prefix, record.get("lock_root", "/tmp")):
        if os.path.exists(lock):
            os.unlink(lock)
            removed.append(lock)
    mp_dir = record.get("mp_temp_dir")
    if mp_dir and os.path.basename(mp_dir).startswith("pymp-") and os.path.isdir(mp_dir):
        shutil.rmtree(mp_dir, ignore_errors=True)
        removed.append(mp_dir)
    path.unlink(missing_ok=True)
    if removed:
        log.info("reclaimed %d leftovers of an earlier job of this run: %s", len(removed), ", ".join(removed))
    return removed


def _created_by_this_process() -> set[str]:
    """Names of the shared memory segments that streaming made in this process (the others
    it attached to); read from its live SharedMemory objects."""
    import gc

    from streaming.base.shared.memory import SharedMemory
    return {shm.name for obj in gc.get_objects() if isinstance(obj, SharedMemory) for shm in obj.created_shms}


def release(run_dir: str | os.PathLike, failed: bool = False, shm_dir: Path = SHM_DIR) -> None:
    """At the end of the run on this node (its local leader): remove this node's lock files
    and record, which would otherwise pile up one set per job. At a normal end streaming
    unlinks its shared memory itself; after a failure (``failed``) this process unlinks
    its segments too (and tells its resource tracker, which would otherwise warn about
    them at exit), so a failed job leaves nothing in /dev/shm or the run directory."""
    path = record_path(run_dir)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("pid") != os.getpid():
        return
    prefix = int(record["prefix"])
    if failed and _locals_of(prefix, shm_dir) in (record.get("locals"), None):
        from multiprocessing import resource_tracker
        created_here = _created_by_this_process()
        for name in _segment_names(prefix):
            try:
                (shm_dir / name).unlink()
            except FileNotFoundError:
                continue
            # only for a segment this process made: its resource tracker knows no other, and
            # unregistering one it does not know prints a KeyError traceback at exit (another
            # rank of the node may have made it: ranks race to create each segment)
            if name in created_here:
                resource_tracker.unregister(f"/{name}", "shared_memory")
    for lock in _lock_files(prefix, record.get("lock_root", "/tmp")):
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
    path.unlink(missing_ok=True)
