"""``albef-data bench DIR``: loader throughput (pairs/s) by number of workers and
augmentation, and optionally converter throughput, as a Markdown table (and JSON).

Loader settings: ``crop`` = RandomResizedCrop + flip (no RandAugment), ``randaugment`` =
ALBEF's full pretraining transform. Every setting builds the real training loader
(build_train_loader: decode, augment, tokenise, collate), skips 2 warm-up batches and
times the next ``--batches``; the median of ``--repeats`` runs is reported (a shared machine
is noisy). Per-worker figures divide by max(workers, 1) (0 workers =
the main process does the work).
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time


def machine() -> str:
    cpus = os.cpu_count()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return f"{cpus} CPU cores ({model or platform.processor()}), Python {platform.python_version()}"


def bench_loader(dir_: str, tokenizer, workers: int, res: int, batch: int, batches: int, mode: str) -> dict:
    from albef_ds.config import Config
    from albef_ds.data import build_train_loader

    cfg = Config()
    cfg.model.image_res = res
    cfg.data.train_dirs = [dir_]
    cfg.data.num_workers = workers
    cfg.data.pin_memory = False
    cfg.data.randaugment = mode == "randaugment"
    cfg.train.micro_batch_size = batch
    loader = build_train_loader(cfg, tokenizer, 0, 1)
    n, start = 0, None
    for i, b in enumerate(loader):
        if i == 2:
            start, cpu_start = time.perf_counter(), time.process_time()
        elif i > 2:
            n += len(b["key"])
        if i == batches + 2:
            break
    if start is None or n == 0:
        raise ValueError(f"{dir_} is too small for {batches + 3} batches of {batch}")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del loader
    rate = n / elapsed
    r = {"kind": "loader", "mode": mode, "workers": workers, "image_res": res, "batch": batch,
         "pairs": n, "seconds": round(elapsed, 3), "pairs_per_s": round(rate, 1),
         "pairs_per_s_per_worker": round(rate / max(workers, 1), 1)}
    if workers == 0:
        # all the work is in this process: pairs per CPU-second is what one worker core
        # delivers, whatever else the (shared) machine is running
        r["pairs_per_cpu_s"] = round(n / cpu, 1)
    return r


def bench_convert(input_path: str, workers: int, rows_per_unit: int) -> dict:
    from data_tools.convert import ConvertOptions, convert
    from data_tools.readers import ReaderOptions

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        stats = convert([input_path], ConvertOptions(out=out, workers=workers, progress=False, merge=True,
                                                     reader=ReaderOptions(rows_per_unit=rows_per_unit)))
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    rate = stats["kept"] / elapsed
    return {"kind": "convert", "workers": workers, "pairs": stats["kept"], "seconds": round(elapsed, 3),
            "pairs_per_s": round(rate, 1), "pairs_per_s_per_worker": round(rate / workers, 1),
            # this process plus its (reaped) worker processes: robust on a shared machine
            "pairs_per_cpu_s": round(stats["kept"] / cpu, 1), "load_avg_1m": os.getloadavg()[0]}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_bench(args) -> list[dict]:
    from albef_ds.tokenizer import build_vocab, load_tokenizer

    results = []
    if args.convert:
        import streaming  # noqa: F401  (its import, seconds, is not conversion time)
        bench_convert(args.convert, 1, args.convert_rows_per_unit)  # warm the page cache
        for w in [int(x) for x in args.convert_workers.split(",")]:
            runs = [bench_convert(args.convert, w, args.convert_rows_per_unit) for _ in range(args.repeats)]
            r = sorted(runs, key=lambda x: x["pairs_per_s"])[len(runs) // 2]  # the median run
            r["repeats"] = [x["pairs_per_s"] for x in runs]
            print(f"convert  workers={w}: {r['pairs_per_s']:.0f} pairs/s ({r['pairs_per_s_per_worker']:.0f} per worker)")
            results.append(r)
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else build_vocab([args.dir], tmp, 1024)
        for mode in args.modes.split(","):
            if mode not in ("crop", "randaugment"):
                raise ValueError(f"unknown bench mode {mode!r} (crop, randaugment)")
            for w in [int(x) for x in args.workers.split(",")]:
                if not results or results[-1]["kind"] == "convert":  # warm caches, not timed
                    bench_loader(args.dir, tok, w, args.image_res, args.batch_size, 4, mode)
                runs = [bench_loader(args.dir, tok, w, args.image_res, args.batch_size, args.batches, mode)
                        for _ in range(args.repeats)]
                r = sorted(runs, key=lambda x: x["pairs_per_s"])[len(runs) // 2]  # the median run
                r["repeats"] = [x["pairs_per_s"] for x in runs]
                print(f"loader   {mode:<11} res={args.image_res} workers={w}: {r['pairs_per_s']:.0f} pairs/s "
                      f"({r['pairs_per_s_per_worker']:.0f} per worker)")
                results.append(r)
    print("\n" + markdown(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)
    return results


def markdown(results: list[dict]) -> str:
    lines = [f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end", "",
             "| what | settings | workers | pairs/s | pairs/s per worker | pairs per CPU-second |",
             "|---|---|---|---|---|---|"]
    for r in results:
        what = "convert" if r["kind"] == "convert" else "loader"
        settings = "" if r["kind"] == "convert" else f"{r['mode']}, {r['image_res']} px, batch {r['batch']}"
        cpu = f"{r['pairs_per_cpu_s']:.0f}" if "pairs_per_cpu_s" in r else ""
        lines.append(f"| {what} | {settings} | {r['workers']} | {r['pairs_per_s']:.0f} | "
                     f"{r['pairs_per_s_per_worker']:.0f} | {cpu} |")
    return "\n".join(lines)
