"""Stopping on a signal: every rank agrees on one step, saves, and exits for a requeue.

SIGUSR1 (SLURM's warning before the time limit), SIGTERM (scancel, preemption) and SIGINT
set a flag; the Trainer reduces it over ranks after each optimizer step.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

#: exit status of a run stopped by a signal after its checkpoint was committed: the batch
#: script requeues on it. 0 means the planned final step was reached.
EXIT_PREEMPTED = 3


def _start_resource_tracker_deaf_to_sigusr1() -> None:
    """Start multiprocessing's resource tracker with SIGUSR1 blocked (it inherits the mask;
    it ignores SIGINT/SIGTERM itself, not SIGUSR1). SLURM delivers a step's signals to every
    process of the step: a tracker killed by the USR1 warning is relaunched empty, and every
    shared-memory segment unlinked afterwards printed a KeyError traceback at the stop."""
    from multiprocessing import resource_tracker
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopFlag:
    """Set by a signal on any rank; all ranks learn of it at the same step. Created first
    thing, so that a signal during the start-up asks for a stop too (the default action of
    SIGUSR1 would end the rank without a word)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        _start_resource_tracker_deaf_to_sigusr1()

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def worker_ignores_stop_signals(previous_init, worker_id: int) -> None:
    """DataLoader worker init: leave SIGUSR1/SIGTERM/SIGINT to the rank. SLURM signals every
    process of a step (scancel, requeue, preemption): a worker killed by SIGTERM makes the
    rank raise ("DataLoader worker ... killed by signal") instead of saving a checkpoint.
    The rank shuts its workers down itself when it exits."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if previous_init is not None:
        previous_init(worker_id)


def end_loader_workers() -> None:
    """SIGKILL this process's loader workers before an error unwinds the rank. They ignore
    SIGTERM (see above), and at exit multiprocessing SIGTERMs its daemonic children and then
    joins them: without this, an error in the loop (a bad shard, a bug, a lost peer) hangs
    the rank until the job's time limit instead of ending it."""
    import multiprocessing
    for child in multiprocessing.active_children():
        child.kill()
