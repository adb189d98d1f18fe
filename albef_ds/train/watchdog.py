"""A failure on one rank ends every rank of the job within seconds.

Without it, a rank that raises (at start-up, at resume, in the loop) leaves the others
waiting where they are: in a collective, in streaming's shared-memory barrier, in
DeepSpeed's save barrier. The launcher then SIGKILLs them one by one after its own
timeout (measured: 151-173 s at 4 ranks), their loader workers (which ignore SIGTERM)
linger, and a SLURM requeue burns allocation meanwhile.

:class:`JobWatchdog` publishes a failure in the process group's key-value store (the
TCPStore that rank 0 serves at MASTER_ADDR:MASTER_PORT, which every launcher sets up) and
polls it from a daemon thread on every rank. A rank that sees another's failure, or loses
the store (rank 0 died), ends itself: its loader workers killed, its shared memory
released (:func:`release_local_resources`), then ``os._exit``: a thread cannot interrupt
the main thread out of a collective, so the process ends from under it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

#: the store key a failing rank writes (one job, one store: no run id needed)
ABORT_KEY = "albef_ds/abort"
#: each rank that saw the failure adds 1 here before it ends: rank 0 serves the store and
#: waits for them (a bounded time), so the others read the reason instead of losing the store
ACK_KEY = "albef_ds/abort_seen"
#: exit status of a rank ended because another failed
EXIT_PEER_FAILED = 1


class JobWatchdog:
    """``store``: a torch.distributed Store (None: one process, nothing to watch).
    ``on_exit``: called before a rank ends itself (release what the process holds).
    ``poll_s``: how often each rank asks the store (a few bytes each time); a failure ends
    the job within about ``poll_s`` plus the time the others take to exit."""

    def __init__(self, store, rank: int, world_size: int = 1, on_exit: Callable[[], None] = lambda: None,
                 poll_s: float = 1.0, lost_store_grace_s: float = 5.0, log=None):
        self.store, self.rank, self.world_size, self.on_exit, self.poll_s = store, rank, world_size, on_exit, poll_s
        self.lost_store_grace_s = lost_store_grace_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._failing = False  # this rank is failing itself: it exits on its own, with its own error
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "JobWatchdog":
        if self.store is not None:
            self._thread = threading.Thread(target=self._watch, name="albef-job-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (every rank, before the last barrier of a normal end: after it,
        rank 0 may exit and take the store with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def fail(self, reason: str) -> None:
        """This rank is failing: tell every other rank (best effort: the store may be gone)."""
        self._failing = True
        self._stop.set()
        if self.store is None:
            return
        try:
            self.store.set(ABORT_KEY, f"rank {self.rank}: {reason}"[:2000])
        except Exception:  # rank 0 (the store) is gone already: the others lose it too
            return
        # Every rank, not only rank 0 (which serves the store), waits a few polls for the others
        # to read the failure: a launcher that sees this rank exit kills the rest at once, and
        # they would end without a word on why (seen once this rank's exit got faster).
        self._wait_until_read(expected=self.world_size - 1)

    def _watch(self) -> None:
        lost_since = None
        while not self._stop.wait(self.poll_s):
            try:
                failed = self.store.check([ABORT_KEY])
                reason = self.store.get(ABORT_KEY).decode(errors="replace") if failed else None
                lost_since = None
            except Exception as e:  # the store answers no more: rank 0 is gone
                if self._stop.is_set():
                    return
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since < self.lost_store_grace_s:
                    continue
                reason = f"lost rank 0's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({e})"
            if reason is None or self._stop.is_set() or self._failing:
                continue
            self._end(reason)

    def _end(self, reason: str) -> None:
        self.log(f"albef-ds: rank {self.rank} ends: another rank failed ({' '.join(reason.split())[:500]})")
        try:
            self.store.add(ACK_KEY, 1)
            if self.rank == 0:  # it serves the store: all but the failed rank and itself read it first
                self._wait_until_read(expected=self.world_size - 2)
            self.on_exit()
        finally:
            os._exit(EXIT_PEER_FAILED)

    def _wait_until_read(self, expected: int) -> None:
        """Wait until ``expected`` ranks have read the failure, at most a few polls, so that
        none of them is killed or loses the store before it has said why it ends."""
        if expected <= 0:
            return
        deadline = time.monotonic() + 3 * self.poll_s + 2.0
        while time.monotonic() < deadline:
            try:
                if self.store.add(ACK_KEY, 0) >= expected:
                    return
            except Exception:
                return
            time.sleep(0.05)


def process_group_store(timeout_s: float = 30.0):
    """A client of the TCPStore the launch environment points at (rank 0 serves it as the
    process group's store); None without a process group of several ranks."""
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)
