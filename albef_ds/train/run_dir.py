"""A run directory holds one run: a lock for the life of the run, the refusal to start a
new run over an old one's files (unless told to clear them), and absolute paths in the
config it saves.

- :class:`RunDirLock`: rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` from
  start-up to the end of the run; a second start into the directory is refused with the
  holder's host and pid. The kernel drops the lock when the holder dies (kill -9, a lost
  node's process), so a stale lock file never blocks the resume that follows.
- :func:`prepare_fresh_start`: ``--resume none`` into a directory holding a previous run's
  checkpoints or metrics is an error naming them; ``--overwrite`` removes them first, so
  neither rotation (newest by step) nor ``export`` can mix the old run into the new one.
- :func:`absolute_paths`: the data, tokenizer and weights paths made absolute before
  ``config.yaml`` is written, so the saved config (and an export's copy) work from any
  working directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import UsageError

LOCK_FILE = ".lock"

#: what a run writes into its directory (besides config.yaml, which every start rewrites):
#: removed by ``--overwrite``, and what makes a directory "hold a run".
RUN_OUTPUTS = ("checkpoints", "exports", "metrics.jsonl", "tensorboard", "best.json", "DONE")
RUN_OUTPUT_GLOBS = ("sample_keys_rank*.jsonl",)


class RunDirBusyError(UsageError):
    """Another process holds the run directory's lock."""


class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, the holder's host/pid/start time written
    into the file. Released by :meth:`release` or by the holder's death."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusyError(
                f"run directory {self.path.parent} is in use by another run ({self._holder()}); a run "
                f"directory holds one run: wait for it to end, or give another --run-dir") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            h = {}
        if not h:
            return "holder unknown"
        return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_error(run_dir: str | os.PathLike, error: OSError) -> str:
    """One line for a lock that could not be taken at all (not held by another run)."""
    name = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__
    hint = (": the file system does not support flock (Lustre: mount with -o flock); put logging.run_dir on "
            "one that does" if error.errno in (errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP) else "")
    return f"cannot lock {Path(run_dir) / LOCK_FILE}: {error.strerror or error} ({name}){hint}"


def previous_run_outputs(run_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in ``run_dir`` (the paths ``--overwrite`` removes)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    for pattern in RUN_OUTPUT_GLOBS:
        found += sorted(run_dir.glob(pattern))
    # An empty checkpoints/ or exports/ folder holds nothing of a run.
    return [p for p in found if not (p.is_dir() and not any(p.iterdir()))]


def prepare_fresh_start(run_dir: str | os.PathLike, overwrite: bool, log=print) -> None:
    """Before a run starts from scratch (``--resume none``) in ``run_dir`` (rank 0, under
    the lock): refuse if an earlier run's outputs are there, or remove them with
    ``overwrite``."""
    found = previous_run_outputs(run_dir)
    if not found:
        return
    names = ", ".join(p.name for p in found)
    if not overwrite:
        raise UsageError(f"run directory {run_dir} holds an earlier run ({names}); --resume none would mix "
                         f"a new run into it: give --overwrite to delete them and start afresh, "
                         f"--resume auto to continue that run, or another --run-dir")
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    log(f"note: --overwrite: removed the earlier run's {names} from {run_dir}")


#: config keys holding local paths (lists of paths for *_dirs / *_files): made absolute
#: in the saved config. Remote URLs ('://') are left as they are.
PATH_KEYS = (("data", "train_dirs"), ("data", "val_dir"), ("data", "tokenizer"), ("data", "cache_dir"),
             ("task", "train_files"), ("task", "val_file"), ("task", "image_root"),
             ("checkpoint", "init_from"), ("checkpoint", "bert_init"), ("checkpoint", "vit_init"),
             ("logging", "run_dir"))


def _absolute(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_absolute(v) for v in value)
    if not isinstance(value, str) or not value or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def absolute_paths(cfg) -> None:
    """Make the config's local paths absolute (relative to the current directory), in place."""
    for section, key in PATH_KEYS:
        part = getattr(cfg, section, None)
        if part is not None and hasattr(part, key):
            setattr(part, key, _absolute(getattr(part, key)))
