"""``albef-data convert``: inputs -> MDS parts -> one merged dataset.

The inputs are split into units (see :mod:`data_tools.readers`); unit ``i`` becomes the
part ``OUT/part-{i:06d}``. Array task ``I`` of ``T`` takes the units with ``i % T == I``
(deterministic, and balanced when units are similar in size). ``--workers N`` converts N
units at a time in separate processes. A part is renamed into place only when complete,
so re-running after a crash or kill skips the finished parts, redoes the rest, and never
writes a pair twice. ``OUT/plan.json`` records the inputs so a re-run with other inputs
into the same folder is refused.

Ctrl-C (SIGINT) ends the workers, keeps the finished parts and raises KeyboardInterrupt;
the CLI says that re-running the same command resumes (:data:`INTERRUPTED`).

A conversion that keeps nothing is reported (``stats["nothing_kept"]``, the CLI exits 1):
judged on the merged dataset, or on an array task's own parts when it does not merge, so
a resumed run whose parts were all done before is judged on what those parts hold.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from data_tools.diagnose import nothing_kept_message
from data_tools.readers import InputError, ReaderOptions, plan_input, read_unit
from data_tools.records import RawPair, check_pair, source_name
from data_tools.writer import DEFAULT_SHARD_SIZE, PartWriter, add_stats, empty_stats, is_complete_part


@dataclass
class ConvertOptions:
    out: str
    fmt: Optional[str] = None
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    workers: int = 1
    num_tasks: int = 1
    task_id: int = 0
    exclude: tuple = ()
    exclude_image_root: Optional[str] = None
    max_side: Optional[int] = None
    compression: Optional[str] = None
    shard_size: str = DEFAULT_SHARD_SIZE
    also_parquet: bool = False
    progress: bool = True
    #: merge after converting (default: only when this is the only task).
    merge: Optional[bool] = None


#: what the CLI says when a convert is interrupted: true because finished parts are renamed
#: into place whole and a re-run skips them (the SIGKILL test in tests/data_tools shows it)
INTERRUPTED = ("interrupted; run the same command again to resume where it stopped (finished parts "
               "in {out} are kept, unfinished ones are redone); to start over instead, delete {out} first")


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def plan_units(inputs: list[str], opts: ConvertOptions) -> list[dict]:
    units = []
    for path in inputs:
        if not os.path.exists(path):
            raise InputError(f"input path does not exist: {path}")
        source = opts.reader.source or source_name(path)
        for u in plan_input(path, opts.fmt, opts.reader):
            u["source"] = source
            units.append(u)
    for i, u in enumerate(units):
        u["index"] = i
    return units


def _check_plan(out: str, inputs: list[str], units: list[dict], opts: ConvertOptions) -> None:
    """Refuse to mix parts of different inputs (or settings) in one folder."""
    plan = {"inputs": [os.path.abspath(p) for p in inputs], "format": opts.fmt,
            "units": len(units), "reader": asdict(opts.reader), "max_side": opts.max_side,
            "compression": opts.compression, "exclude": sorted(os.path.abspath(p) for p in opts.exclude)}
    path = os.path.join(out, "plan.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != plan:
            diff = [k for k in plan if plan[k] != old.get(k)]
            raise InputError(f"{out} holds a conversion of other inputs or settings (differs in "
                             f"{', '.join(diff)}); use a new --out folder")
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}
#: rows between two updates of the shared progress counters
PROGRESS_EVERY = 256


def _init_worker(opts: ConvertOptions, exclude: frozenset, counters) -> None:
    # Ctrl-C reaches every process of the terminal's group: the driver alone answers it
    # (ends the pool, says how to resume); a worker would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["opts"], _WORKER["exclude"], _WORKER["counters"] = opts, exclude, counters


def convert_unit(unit: dict, opts: ConvertOptions, exclude: frozenset = frozenset(), counters=None,
                 on_progress=None) -> dict:
    """Convert one unit into its part folder; returns the part's stats. ``counters``:
    optional shared (kept, skipped) values, advanced as rows go by, for the progress bar;
    ``on_progress()`` is called after each advance (in-process runs refresh the bar)."""
    writer = PartWriter(opts.out, part_name(unit["index"]), compression=opts.compression,
                        shard_size=opts.shard_size, also_parquet=opts.also_parquet)
    reported = (0, 0)
    try:
        for raw in read_unit(unit, opts.reader):
            item = check_pair(raw, opts.max_side, exclude) if isinstance(raw, RawPair) else raw
            writer.add(item)
            if counters is not None and writer.stats["read"] % PROGRESS_EVERY == 0:
                reported = _report(counters, writer.stats, reported)
                if on_progress is not None:
                    on_progress()
        stats = writer.commit()
        if counters is not None:
            _report(counters, stats, reported)
        return stats
    except BaseException:
        writer.abort()
        raise


def _report(counters, stats: dict, reported: tuple) -> tuple:
    kept, skipped = stats["kept"], stats["read"] - stats["kept"]
    with counters[0].get_lock():
        counters[0].value += kept - reported[0]
    with counters[1].get_lock():
        counters[1].value += skipped - reported[1]
    return kept, skipped


def _convert_in_worker(unit: dict) -> dict:
    return convert_unit(unit, _WORKER["opts"], _WORKER["exclude"], _WORKER["counters"])


# ----------------------------------------------------------------------------- driver

def convert(inputs: list[str], opts: ConvertOptions) -> dict:
    """Convert this task's share of the inputs (skipping finished parts); returns stats of
    the work done now (and the merged stats when it merges)."""
    from data_tools.exclude import load_exclude_hashes
    from data_tools.merge import merge
    import streaming  # noqa: F401  (imported once here, inherited by forked workers)

    if not 0 <= opts.task_id < opts.num_tasks:
        raise InputError(f"--task-id {opts.task_id} is outside [0, --num-tasks={opts.num_tasks})")
    units = plan_units(inputs, opts)  # before creating --out: a bad input leaves nothing behind
    if not units:
        raise InputError(f"the inputs hold no rows (0 of 0): {', '.join(inputs)}")
    os.makedirs(opts.out, exist_ok=True)
    _check_plan(opts.out, inputs, units, opts)
    exclude = load_exclude_hashes(opts.exclude, opts.exclude_image_root) if opts.exclude else frozenset()

    mine = [u for u in units if u["index"] % opts.num_tasks == opts.task_id]
    # Leftovers of a killed run of this task: temporary folders of units it owns.
    owned = {part_name(u["index"]) for u in mine}
    for e in os.scandir(opts.out):
        if e.name.startswith(".tmp-") and e.name[5:].rsplit("-", 1)[0].split(".")[0] in owned:
            shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.remove(e.path)
    todo = [u for u in mine if not is_complete_part(os.path.join(opts.out, part_name(u["index"])))]
    done_before = len(mine) - len(todo)

    stats = empty_stats()
    bar = _progress(len(mine), done_before, opts.progress)
    start = time.time()

    ctx = mp.get_context("fork")  # workers inherit the imported modules (streaming imports torch)
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))  # kept, skipped: updated as rows go by

    def account(s: dict | None) -> None:
        if s is not None:
            add_stats(stats, s)
            bar.update(1)
        kept = counters[0].value
        rate = kept / max(time.time() - start, 1e-9)
        bar.set_postfix(pairs_per_s=f"{rate:.0f}", kept=str(kept), skipped=str(counters[1].value))

    try:
        if opts.workers <= 1 or len(todo) <= 1:
            for u in todo:
                account(convert_unit(u, opts, exclude, counters, on_progress=lambda: account(None)))
        else:
            with ctx.Pool(min(opts.workers, len(todo)), initializer=_init_worker,
                          initargs=(opts, exclude, counters)) as pool:
                results = pool.imap_unordered(_convert_in_worker, todo)
                remaining = len(todo)
                while remaining:
                    try:
                        s = results.next(timeout=1.0)
                    except mp.TimeoutError:
                        account(None)  # refresh pairs/s and skips while long parts run
                        continue
                    account(s)
                    remaining -= 1
    finally:  # also on Ctrl-C: the bar's line ends before the interruption is reported
        bar.close()
    elapsed = time.time() - start
    stats["seconds"] = round(elapsed, 3)
    stats["units_done_now"] = len(todo)
    stats["units_done_before"] = done_before
    print(f"task {opts.task_id}/{opts.num_tasks}: converted {len(todo)} units "
          f"({done_before} already done): kept {stats['kept']} of {stats['read']} rows in "
          f"{elapsed:.1f}s ({stats['kept'] / max(elapsed, 1e-9):.0f} pairs/s)", file=sys.stderr)
    if not mine:
        print(f"task {opts.task_id}/{opts.num_tasks}: no units of the {len(units)} fall to this task",
              file=sys.stderr)
    do_merge = opts.merge if opts.merge is not None else opts.num_tasks == 1
    if do_merge:
        stats["merged"] = merge(opts.out)  # its line names the skip reasons: printed without the bar too
    elif opts.num_tasks > 1:
        print(f"when all {opts.num_tasks} tasks are done: albef-data merge {opts.out}", file=sys.stderr)
    stats["nothing_kept"] = _nothing_kept(opts.out, mine, stats.get("merged"))
    return stats


#: sampled rejects read to explain an empty result (enough for every reason's examples)
DIAGNOSE_REJECTS = 1000


def _nothing_kept(out: str, mine: list[dict], merged: Optional[dict]) -> Optional[str]:
    """The message when the merged dataset, or (not merging) this task's parts, kept nothing."""
    if merged is not None:
        totals, reject_files = merged, [os.path.join(out, "rejects.jsonl")]
        shown = reject_files[0]
    elif mine:
        parts = [os.path.join(out, part_name(u["index"])) for u in mine]
        totals = empty_stats()
        for p in parts:
            with open(os.path.join(p, "stats.json"), encoding="utf-8") as f:
                add_stats(totals, json.load(f))
        reject_files = [os.path.join(p, "rejects.jsonl") for p in parts]
        shown = os.path.join(out, "part-*", "rejects.jsonl")
    else:
        return None  # an array task without units has nothing to keep
    if totals["kept"]:
        return None
    rejects: list[dict] = []
    for path in reject_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rejects.append(json.loads(line))
                if len(rejects) >= DIAGNOSE_REJECTS:
                    break
        if len(rejects) >= DIAGNOSE_REJECTS:
            break
    return nothing_kept_message(totals, rejects, shown)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="part", desc="convert", disable=not enabled,
                dynamic_ncols=True)
