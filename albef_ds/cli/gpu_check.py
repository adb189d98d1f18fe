"""``albef-ds gpu-check``: one prepared check of a lent GPU, in minutes (docs/gpu.md).

    albef-ds gpu-check --out gpu_check/              # on the GPU (scripts/gpu_check.sh installs wheels first)
    albef-ds gpu-check --dry-run --out /tmp/gc       # the same parts end to end on a CPU, in seconds

In order, each part's result written as soon as it is known (a run cut short keeps what
it measured): the environment; a 20-step tiny pretraining run on synth data, run through,
stopped by SIGTERM half-way and resumed, compared bit for bit; a few fp16 steps with
DeepSpeed's loss scaling; the Trainer's real step (``albef-ds bench``'s trainer bench) for
albef-base at 256 px in bf16 at batch 64 and 128; each fast path of ``albef-ds bench
--switches`` (read from its SWITCHES, so new switches appear here) while the time budget
lasts; last, the largest batch that fits (last: an engine that ran out of memory may not
give all of it back). Out: ``gpu_check.json`` and ``gpu_check.md`` (the table for
docs/benchmarks.md). Exit 0 when every part ran and the resume was exact, 1 otherwise.

Without CUDA (or with ``--dry-run``) the same parts run small: the tiny config, batch 4,
one or two timed steps, a 6-step kill/resume, two switches; fp16 is skipped (DeepSpeed
refuses it on a CPU). The output says it is a dry run: its numbers measure nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

#: the small model the kill/resume and fp16 parts train (tiny with 2 layers, as
#: tests/train/test_pretrain.py): what they check is the engine's machinery, not the model
SMALL_MODEL = ["model.vision_depth=2", "model.text_depth=2", "model.fusion_layer=1", "model.momentum=0.9"]
#: what a GPU run measures, sized for about 8 minutes on an H200: the switches stop at
#: budget_s, leaving about 2 minutes for the largest-batch search
GPU = {"config": "albef-base", "batches": [64, 128], "max_batch": 1024, "steps": 5, "warmup": 2,
       "step_overrides": [], "switch_batch": 32, "switch_steps": 3, "budget_s": 330,
       "kill_steps": 20, "kill_stop_at": 12, "kill_batch": 16, "fp16_steps": 8, "synth_pairs": 640,
       "loader_workers": 1}
#: the dry run: every part, as small as still exercises it
DRY = {"config": "tiny", "batches": [4], "max_batch": 8, "steps": 2, "warmup": 1,
       "step_overrides": SMALL_MODEL, "switch_batch": 4, "switch_steps": 1, "budget_s": 600, "switches": 2,
       "kill_steps": 6, "kill_stop_at": 3, "kill_batch": 4, "fp16_steps": 2, "synth_pairs": 64,
       # no loader worker: starting one (a fresh interpreter importing torch) costs more than 6 steps
       "loader_workers": 0}

#: the parts --skip can leave out (the environment always runs: the table's heading needs it)
PARTS = ("kill_resume", "fp16", "trainer_step", "switches", "largest_batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, gpu_check.md and the runs")
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU-sized version of every part (automatic without CUDA)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--config", default=None, help="the timed step's config (default: albef-base; dry run: tiny)")
    add_overrides(p, "override a value of the timed step's config (repeatable)")
    p.add_argument("--batches", default=None, help="comma-separated batches timed (default 64,128; dry run 4)")
    p.add_argument("--max-batch", type=int, default=None, help="where the doubling search stops (default 1024)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds into the run after which the remaining switches are skipped (default 330)")


def settings(args) -> tuple[dict, str | None]:
    """The sizes to run at, and why this is a dry run (None for a real one)."""
    import torch
    reason = "--dry-run" if args.dry_run else (None if torch.cuda.is_available() else "no CUDA device")
    s = dict(DRY if reason else GPU)
    if args.config:
        s["config"] = args.config
    if args.batches:
        s["batches"] = [int(b) for b in args.batches.split(",")]
    if args.max_batch:
        s["max_batch"] = args.max_batch
    if args.budget_s is not None:
        s["budget_s"] = args.budget_s
    return s, reason


def synth_data(root: Path, pairs: int) -> tuple[Path, Path]:
    """Synth shards and a vocabulary for the small runs (reused when already there)."""
    from data_tools.synth import SynthOptions, synth

    from ..tokenizer import build_vocab
    data, tok = root / "data", root / "tokenizer"
    if not (data / "synth.json").is_file():
        synth(SynthOptions(out=str(data), seed=0, num_train=pairs, num_val=8, num_test=8, workers=1, progress=False))
    if not (tok / "tokenizer.json").is_file():
        build_vocab([str(data / "captions.txt")], tok, vocab_size=300)
    return data, tok


def small_run_overrides(data: Path, tok: Path, batch: int, every: int, workers: int) -> list[str]:
    return [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}", f"train.micro_batch_size={batch}",
            "train.lr=1e-3", "train.warmup_steps=2", f"checkpoint.every_steps={every}", "checkpoint.keep_last=10",
            "logging.progress_bar=false", "logging.tensorboard=false", f"data.num_workers={workers}", *SMALL_MODEL]


def measure_step(s: dict, args, batch: int) -> dict:
    """The Trainer's step at ``batch`` through the bench, with the executed-FLOP
    utilisation and the peak memory (and what was allocated before: an engine an earlier
    try left behind would show there, not as this batch's own)."""
    import torch

    from .. import gpu_check as gc
    from ..model_info import device_peak_flops
    from . import bench
    ns = argparse.Namespace(config=s["config"], overrides=[*s["step_overrides"], *args.overrides,
                                                            f"train.micro_batch_size={batch}"],
                            data=False, batch=batch, text_len=None, warmup=s["warmup"], steps=s["steps"])
    before = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    r = gc.with_peak_memory(lambda: bench.trainer_bench(ns))
    r["allocated_before_gb"] = before
    peak = device_peak_flops(r["device"], r["precision"])
    r["executed_util"] = r["executed_tflops"] * 1e12 / peak if peak else None
    r.pop("losses", None)  # per-step losses of a synthetic batch: not what this report is for
    return r


def trainer_step(s: dict, args) -> dict:
    """The Trainer's step at each of the configured batches."""
    from .. import gpu_check as gc
    from ..config import load_config
    results = []
    for b in s["batches"]:
        results.append(measure_step(s, args, b))
        gc.free_cuda()
    cfg = load_config(s["config"], [*s["step_overrides"], *args.overrides])
    first = results[0]
    return {"config": s["config"], "image_res": cfg.model.image_res, "precision": first["precision"],
            "zero_stage": first["zero_stage"], "optimizer": first["optimizer"], "results": results}


def largest_batch(s: dict, args, step: dict) -> dict:
    """Doubling from twice the largest configured batch until out of memory; the largest
    that fitted joins the step's results. Run last: an engine that ran out of memory may
    not give all of it back."""
    from .. import gpu_check as gc
    search = gc.largest_batch(lambda b: measure_step(s, args, b), max(s["batches"]) * 2, s["max_batch"])
    result = search.pop("result")
    if result is not None and "results" in step:
        step["results"].append(result)
    step["largest_batch"] = search
    return search


def switches(s: dict, args, started: float) -> dict:
    """Each switch of the bench's SWITCHES timed both ways (bench.switch_specs), after the
    noise floor, until the budget is spent; a switch left out is listed as skipped."""
    import torch

    from . import bench
    names = [name for name, _, _ in bench.SWITCHES][:s.get("switches")]
    ns = argparse.Namespace(config=s["config"], overrides=[*s["step_overrides"], *args.overrides],
                            batch=s["switch_batch"],
                            text_len=None, steps=s["switch_steps"], warmup=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = [("none", "noise floor (fast vs fast)", "fast", "fast")]
    for name, ref_value, fast_value in bench.SWITCHES:
        if name in names:
            pairs += [(name, *spec) for spec in bench.switch_specs(name, ref_value, fast_value)]
    rows, skipped = [], []
    for name, label, a, b in pairs:
        if time.time() - started > s["budget_s"]:
            skipped.append(label)
            continue
        out = bench.compare(ns, [a, b], device, phases=False)
        ra, rb = out["results"]
        rows.append({"switch": name, "label": label, "a": a, "b": b, "a_pairs_per_s": ra["pairs_per_s"],
                     "b_pairs_per_s": rb["pairs_per_s"], "ratio": out["ratio"],
                     "paired_median": out["paired_median"], "n": out["n"]})
        print(f"{label:42s} {ra['pairs_per_s']:8.2f} -> {rb['pairs_per_s']:8.2f} pairs/s  x{out['ratio']:.3f}",
              flush=True)
    return {"batch": s["switch_batch"], "steps": s["switch_steps"], "all_switches": [n for n, _, _ in bench.SWITCHES],
            "measured": names, "rows": rows, "skipped": skipped}


def run(args) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from .. import gpu_check as gc
    s, reason = settings(args)
    skip = {p for p in args.skip.split(",") if p}
    unknown = skip - set(PARTS)
    if unknown:
        from ..errors import UsageError
        raise UsageError(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": reason is not None,
              "dry_run_reason": reason, "settings": s, "failed_parts": []}
    if reason:
        print(f"gpu-check: DRY RUN ({reason}): every part at CPU size; the numbers measure nothing", flush=True)

    def write() -> None:
        report["elapsed_s"] = time.time() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(gc.markdown_table(report))

    def part(name: str, fn) -> None:
        if name in skip:
            report[name] = {"status": "skipped (--skip)"}
            return
        print(f"\n== gpu-check: {name} ({time.time() - started:.0f} s in)", flush=True)
        try:
            report[name] = fn()
        except Exception as e:  # the other parts still run; the JSON says what failed and why
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
            report["failed_parts"].append(name)
            gc.free_cuda()
        write()

    report["environment"] = gc.environment()  # the table's heading needs it: never skipped
    write()
    data = tok = None
    if not {"kill_resume", "fp16"} <= skip:
        data, tok = synth_data(out / "synth", s["synth_pairs"])
    part("kill_resume", lambda: gc.kill_resume(
        "tiny", small_run_overrides(data, tok, s["kill_batch"], max(2, s["kill_steps"] // 4), s["loader_workers"]),
        out / "kill_resume", s["kill_steps"], s["kill_stop_at"]))
    part("fp16", lambda: gc.fp16_check("tiny", small_run_overrides(data, tok, s["kill_batch"], 1000, s["loader_workers"]),
                                       s["fp16_steps"], out / "fp16"))
    part("trainer_step", lambda: trainer_step(s, args))
    part("switches", lambda: switches(s, args, started))
    part("largest_batch", lambda: largest_batch(s, args, report.setdefault("trainer_step", {})))

    kr = report.get("kill_resume", {})
    if "kill_resume" not in skip and not kr.get("ok"):
        report["failed_parts"].append("kill_resume (not exact)" if "error" not in kr else "kill_resume")
    fp = report.get("fp16", {})
    if fp.get("status") == "ran" and not fp.get("all_finite"):
        report["failed_parts"].append("fp16 (non-finite losses)")
    report["failed_parts"] = sorted(set(report["failed_parts"]))
    write()
    print("\n" + gc.markdown_table(report))
    print(f"gpu-check: {time.time() - started:.0f} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
          + (f"; FAILED: {', '.join(report['failed_parts'])}" if report["failed_parts"] else "; every part passed"),
          flush=True)
    return 1 if report["failed_parts"] else 0

