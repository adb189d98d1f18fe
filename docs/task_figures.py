"""Reproduce the downstream-task table of docs/benchmarks.md: each task fine-tuned from one
demo-sized pretrained run on its synthetic version (``albef-data synth-tasks``), over seeds.

    python docs/task_figures.py --init runs/demo/run --tokenizer runs/demo/tokenizer --out runs/tasks
    python docs/task_figures.py ... --tasks ve vqa --seeds 0 --epochs 1

Per seed: the synth-tasks data of that seed (2,000 train / 200 val / 200 test images), then
``albef-ds finetune --task T`` for ``--epochs`` epochs (train.seed and data.shuffle_seed = the
seed) and ``albef-ds eval --task T`` on the test split with the run's best checkpoint. Runs are
independent processes, ``--parallel`` at a time, one OpenMP thread each; a finished run
(test/metrics.json present) is not run again. Results: OUT/results.json and a Markdown table
on stdout (mean +- sample std over seeds, beside chance). VQA is also split by question type.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = {"ve": ("ve_train", "ve_dev", "ve_test"), "vqa": ("vqa_train", "vqa_val", "vqa_test"),
         "nlvr2": ("nlvr_train", "nlvr_dev", "nlvr_test"),
         "grounding": ("grounding_train", "grounding_val", "grounding_test")}


def run(argv: list[str], log: Path) -> None:
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed: see {log}")


def one(task: str, seed: int, args) -> dict:
    data = Path(args.out) / f"data_seed{seed}"
    run_dir = Path(args.out) / f"{task}_seed{seed}"
    done = run_dir / "test" / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    train, val, test = (data / f"{n}.json" for n in FILES[task])
    sets = [f"task.train_files=[{train}]", f"task.val_file={val}", f"data.tokenizer={args.tokenizer}",
            f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.warmup_steps=20", f"train.seed={seed}",
            f"data.shuffle_seed={seed}", "logging.progress_bar=false", "checkpoint.every_steps=100000",
            "model.queue_size=0"]
    if task == "vqa":
        sets.append(f"task.answer_list={data / 'answer_list.json'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    run(["albef_ds", "finetune", "--task", task, "--config", "tiny", "--init", args.init, "--run-dir", str(run_dir),
         *[a for s in sets for a in ("--set", s)]], log)
    run(["albef_ds", "eval", "--task", task, "--model", str(run_dir), "--split", str(test), "--out",
         str(run_dir / "test")], log)
    metrics = json.loads(done.read_text())
    if task == "vqa":  # accuracy by question type (the first three words)
        answers = {r["question_id"]: r["answer"] for r in json.loads((run_dir / "test" / "results.json").read_text())}
        kinds = defaultdict(list)
        for q in json.loads(test.read_text()):
            kinds[" ".join(q["question"].split()[:2])].append(answers[q["question_id"]] == q["answer"][0])
        metrics["by_type"] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
        done.write_text(json.dumps(metrics, indent=2))
    return metrics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="the pretrained run (or export) every task starts from")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", nargs="+", default=sorted(FILES), choices=sorted(FILES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--parallel", type=int, default=2)
    args = p.parse_args()
    for seed in args.seeds:
        data = Path(args.out) / f"data_seed{seed}"
        if not (data / "synth_tasks.json").is_file():
            subprocess.run([sys.executable, "-m", "data_tools.cli", "synth-tasks", "--out", str(data), "--seed",
                            str(seed), "--num-train", "2000", "--num-val", "200", "--num-test", "200",
                            "--no-progress"], cwd=REPO, check=True)
    jobs = [(t, s) for t in args.tasks for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(lambda j: one(*j, args), jobs)))
    Path(args.out, "results.json").write_text(json.dumps({f"{t}/{s}": m for (t, s), m in results.items()}, indent=2))
    print("| task | test accuracy % (mean +- std) | per seed | chance % |")
    print("|---|---|---|---|")
    for t in args.tasks:
        accs = [100 * results[(t, s)]["acc"] for s in args.seeds]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        chance = statistics.mean(100 * results[(t, s)]["chance"] for s in args.seeds)
        print(f"| {t} | {statistics.mean(accs):.1f} +- {std:.1f} | {', '.join(f'{a:.1f}' for a in accs)} | {chance:.1f} |")
    for s in args.seeds:
        if ("vqa", s) in results:
            print(f"VQA seed {s} by question type:", results[("vqa", s)].get("by_type"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
