"""Reproduce the learning-evidence tables of docs/benchmarks.md: the demo's zero-shot recall
over several seeds, and ablations of ALBEF's ingredients, on the synth data.

    python docs/ablations.py --out runs/ablations              # every arm, seeds 0 1 2
    python docs/ablations.py --out runs/ablations --arms baseline no_queue --seeds 0

Arms (each pretrains the tiny model from scratch, then runs ``albef-ds eval-retrieval`` on
the seed's synth test split of 1,000 images x 5 captions):

- ``baseline``: ALBEF as the demo trains it (1 process, batch 32, global = local here).
- ``no_mod``: no momentum distillation (``model.alpha=0``).
- ``no_queue``: no queue of momentum features (``model.queue_size=0``).
- ``itm_local``: 2 ranks x 16 pairs, ITM hard negatives drawn from the rank's own 16
  (the reference); its counterpart is ``baseline``, which equals 2 ranks x 16 with global
  negatives exactly (tests/train/test_distributed.py checks that equivalence).
"No ITM re-ranking" needs no run of its own: every evaluation also reports ITC-only recall.

Runs are independent processes with one OpenMP thread each, ``--parallel`` at a time (a
2-rank run counts twice). A finished run (retrieval.json present) is not run again, so an
interrupted sweep continues where it stopped. Results: OUT/results.json and a Markdown
table on stdout (mean +- sample std over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Lock, Semaphore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: arm -> (ranks, overrides)
ARMS = {
    "baseline": (1, []),
    "no_mod": (1, ["model.alpha=0"]),
    "no_queue": (1, ["model.queue_size=0"]),
    "itm_local": (2, ["model.itm_negatives=local", "train.micro_batch_size=16"]),
}
TAKING = Lock()
COLUMNS = ("itm_txt_r1", "itm_img_r1", "itm_txt_r10", "itm_img_r10", "itm_r_mean", "itc_txt_r1", "itc_img_r1",
           "itc_r_mean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(arm: str, seed: int, data: Path, tok: Path, out: Path, steps: int, slots: Semaphore) -> dict:
    result = out / "retrieval" / "retrieval.json"
    if not result.is_file():
        ranks, overrides = ARMS[arm]
        sets = [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}", f"train.max_steps={steps}",
                f"train.seed={seed}", f"data.shuffle_seed={seed}", "logging.progress_bar=false",
                f"checkpoint.every_steps={steps}", *overrides]
        args = ["pretrain", "--config", "tiny", "--run-dir", str(out / "run"), "--resume", "auto"]
        for s in sets:
            args += ["--set", s]
        if ranks == 1:
            cmd = [sys.executable, "-m", "albef_ds", *args]
        else:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                   "--master_port", str(free_port()), "--module", "albef_ds", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out.mkdir(parents=True, exist_ok=True)
        with TAKING:  # a 2-rank run takes both of its slots at once (no deadlock between two)
            for _ in range(ranks):
                slots.acquire()
        try:
            start = time.time()
            with open(out / "log.txt", "w") as log:
                subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
                subprocess.run([sys.executable, "-m", "albef_ds", "eval-retrieval", "--model", str(out / "run"),
                                "--split", str(data / "test.json"), "--tokenizer", str(tok),
                                "--out", str(out / "retrieval")],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
            print(f"{arm} seed {seed}: {time.time() - start:.0f} s", flush=True)
        finally:
            for _ in range(ranks):
                slots.release()
    return json.loads(result.read_text())


def table(results: dict) -> str:
    lines = ["| arm | seeds | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm, per_seed in results.items():
        cells = []
        for c in COLUMNS:
            values = [r[c] for r in per_seed.values()]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{spread}")
        lines.append(f"| {arm} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--parallel", type=int, default=2, help="processes at a time (one thread each)")
    args = p.parse_args()
    from albef_ds.cli.demo import DEFAULT_TEST_IMAGES, DEFAULT_TRAIN_PAIRS, prepare_data

    out = Path(args.out)
    data = {s: prepare_data(out / f"data_seed{s}", s, DEFAULT_TRAIN_PAIRS, DEFAULT_TEST_IMAGES)
            for s in args.seeds}
    slots = Semaphore(max(args.parallel, max(ARMS[a][0] for a in args.arms)))
    jobs = {}
    with ThreadPoolExecutor(max_workers=len(args.arms) * len(args.seeds)) as pool:
        for seed in args.seeds:
            for arm in args.arms:
                d, tok = data[seed]
                jobs[arm, seed] = pool.submit(run_arm, arm, seed, d, tok, out / f"{arm}_seed{seed}",
                                              args.steps, slots)
    results = {arm: {seed: jobs[arm, seed].result() for seed in args.seeds} for arm in args.arms}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
