"""How many intra-op threads each rank's torch uses, when nobody said.

torch's default is one thread per CPU it may run on, in every process: with several ranks
on a node, each with its loader workers, the node's CPUs are oversubscribed many times and
the threads' spin-waits collapse under contention. Measured on 2 cores (docs/benchmarks.md,
"Thread counts"): the demo ran at 3-15 pairs/s with the default beside other work, against
42-61 with one thread. So, unless ``OMP_NUM_THREADS`` is set (a launcher's or the user's
choice, honoured), a rank takes its share of the CPUs left after the loader workers of all
ranks on the node, at least one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str


def choose(cpus: int, ranks_on_node: int, loader_workers: int, omp_num_threads: str | None) -> ThreadChoice:
    """Threads for one rank. ``cpus``: the CPUs this process may run on; ``loader_workers``:
    each rank's loader worker processes (they run beside the rank's own threads)."""
    if omp_num_threads:
        try:
            return ThreadChoice(max(1, int(omp_num_threads)), f"OMP_NUM_THREADS={omp_num_threads}")
        except ValueError:
            pass  # torch itself warns about a malformed value and takes its default; so do we
    ranks = max(1, ranks_on_node)
    left = cpus - ranks * max(0, loader_workers)
    threads = max(1, left // ranks)
    return ThreadChoice(threads, f"{cpus} CPU(s) / {ranks} rank(s) on this node after {ranks} x "
                                 f"{loader_workers} loader worker(s); OMP_NUM_THREADS unset")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def apply(ranks_on_node: int, loader_workers: int) -> ThreadChoice:
    """Choose for this process and set torch's intra-op threads; what was chosen, and why."""
    import torch
    choice = choose(usable_cpus(), ranks_on_node, loader_workers, os.environ.get("OMP_NUM_THREADS"))
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
