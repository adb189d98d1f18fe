"""Stopping on a signal: every rank agrees on one step, saves, and exits for a requeue.

SIGUSR1 (SLURM's warning before the time limit), SIGTERM (scancel, preemption) and SIGINT
set a flag; the Trainer reduces it over ranks after optimizer steps (:class:`StopCheck`:
every step by default, every ``train.stop_check_every`` steps, or asynchronously).
A second SIGINT, at least :data:`SECOND_INTERRUPT_AFTER_S` after the first, ends the rank at
once (KeyboardInterrupt), without the checkpoint: a user's way out of a run that never
reaches its next step.
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

#: exit status of a run stopped by a signal after its checkpoint was committed: the batch
#: script requeues on it. 0 means the planned final step was reached.
EXIT_PREEMPTED = 3

#: a launcher forwards the terminal's Ctrl-C to ranks that the terminal also reached, so one
#: keypress can arrive twice within milliseconds; only a later one is the user's second
SECOND_INTERRUPT_AFTER_S = 2.0


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


#: A launcher's own process in the terminal dies of the same Ctrl-C with a KeyboardInterrupt
#: traceback of its own (deepspeed/launcher/runner.py waits on its child with no handler;
#: nothing in a rank can change that), printed 0.2 s after the keypress (measured, 2 cores).
#: A run stopped by SIGINT under such a launcher says its last line no earlier than this
#: long after the keypress, so that the line is read after that traceback, not inside it.
LAUNCHER_TRACEBACK_S = 1.0

#: what a first Ctrl-C prints while training
TRAINING_INTERRUPT_NOTE = "SIGINT: stopping at the next step with a checkpoint (Ctrl-C again to end now without one)"
#: ... and while evaluating (:meth:`StopFlag.raise_if_requested` between batches)
EVALUATION_INTERRUPT_NOTE = "SIGINT: stopping after the current batch (Ctrl-C again to end now)"


class StopFlag:
    """Set by a signal on any rank; all ranks learn of it at the same step. Created first
    thing, so that a signal during the start-up asks for a stop too (the default action of
    SIGUSR1 would end the rank without a word).

    ``signal_name`` is the first signal received, the one the user or the scheduler sent: a
    launcher passes its own on after it (the deepspeed launcher answers the terminal's
    SIGINT by sending every rank SIGTERM, milliseconds after the SIGINT reached them too).
    An evaluation, which has no step to stop at, calls :meth:`raise_if_requested` between
    its batches."""

    def __init__(self, handle_signals: bool = True, interrupt_note: str = TRAINING_INTERRUPT_NOTE):
        self.requested = False
        self.signal_name = None
        self.first_at = None  # time.monotonic() of the first signal
        self._first_interrupt = None  # time.monotonic() of the first SIGINT
        self._interrupt_note = (interrupt_note + "\n").encode()
        # said once per job, not once per rank: by rank 0 of whichever launcher started it
        # (srun sets SLURM_PROCID, not RANK); read here, not in the handler
        from ..distributed import read_launch_env
        self._announces = read_launch_env().rank == 0
        if not handle_signals:  # a flag only set by hand (the bench times the check alone)
            return
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        _start_resource_tracker_deaf_to_sigusr1()

    def _handler(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGINT:
            first = self._first_interrupt
            if first is not None and now - first >= SECOND_INTERRUPT_AFTER_S:
                raise KeyboardInterrupt("a second Ctrl-C: ended without a checkpoint")
            if first is None:
                self._first_interrupt = now
                if self._announces:
                    # os.write: print() from a handler can re-enter a write already in progress
                    os.write(2, self._interrupt_note)
        self.requested = True
        if self.signal_name is None:
            self.signal_name, self.first_at = signal.Signals(signum).name, now

    def wait_out_launcher_traceback(self, launcher: str) -> None:
        """Before a stopped run's last line: under the deepspeed launcher or torchrun, and when
        the first signal was the terminal's SIGINT, wait until :data:`LAUNCHER_TRACEBACK_S`
        after it (at most that long; a checkpoint save usually took longer already)."""
        if self.signal_name == "SIGINT" and launcher == "deepspeed/torchrun" and self.first_at is not None:
            time.sleep(max(0.0, self.first_at + LAUNCHER_TRACEBACK_S - time.monotonic()))

    def raise_if_requested(self, during: str) -> None:
        """Between an evaluation's batches: :class:`albef_ds.errors.Interrupted` once a signal
        came (``during``: what was being evaluated). Each rank reads its own flag (the ranks
        hold different numbers of batches, so no collective can agree on it): a launcher or
        scheduler signals every rank, and one that stops alone ends the job through it."""
        if self.requested:
            from ..errors import Interrupted
            raise Interrupted(self.signal_name, f"stopped by {self.signal_name} during {during}: no result written; "
                                                f"rerun the same command to evaluate")

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class StopCheck:
    """When the ranks agree on the stop flag (``flag``: a :class:`StopFlag`, or anything
    with ``requested``/``agreed``). ``flag.agreed`` ends in ``.item()``: on a GPU a host
    sync that drains the queued kernels of the step, every step.

    ``every`` N: the flag is reduced only after steps that are multiples of N (the global
    step, so every rank, and a resumed run, checks at the same steps); a stop requested
    after step k is taken at the first multiple of N >= k: within N - 1 steps.
    ``asynchronous``: the reduce of a check step is started without waiting
    (``async_op``), its result copied to host memory behind a CUDA event, and read at
    the next step, when it has long arrived: no sync of the step's work; a stop requested
    after step k is taken within N steps. Every rank starts and reads the same reduces,
    so all still stop at the same step."""

    def __init__(self, flag, every: int = 1, asynchronous: bool = False):
        self.flag, self.every, self.asynchronous = flag, every, asynchronous
        self.pending = None  # (work or None, host tensor, event or None) of the started reduce

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, device: torch.device) -> bool:
        """After optimizer step ``step``: whether every rank stops here."""
        if not self.asynchronous:
            return self.due(step) and self.flag.agreed(device)
        stop = self._read() if self.pending is not None else False
        if not stop and self.due(step):
            self._start(device)
        return stop

    def _start(self, device: torch.device) -> None:
        flag = torch.tensor([1.0 if self.flag.requested else 0.0], device=device)
        work = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if flag.device.type != "cuda":
            self.pending = (work, flag, None)  # gloo: waited (blocking) at the read, a step later
            return
        if work is not None:
            work.wait()  # NCCL: the compute stream waits for the reduce; the host does not
        # Copied to pinned host memory behind an event now, so that the read next step waits
        # for this step's work only (long done), never for the kernels queued since.
        host = torch.empty(1, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (None, host, event)

    def _read(self) -> bool:
        work, flag, event = self.pending
        self.pending = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return bool(flag[0] > 0)

    def drain(self) -> None:
        """Wait for a started reduce (before the process group is torn down)."""
        if self.pending is not None:
            self._read()


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
