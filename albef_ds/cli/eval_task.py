"""``albef-ds eval --task TASK``: a fine-tuned model on a downstream task's split.

    albef-ds eval --task ve --model runs/ve --split data/ve_test.json
    albef-ds eval --task vqa --model runs/vqa --split data/vqa_test.json --out results/vqa
    albef-ds eval --task grounding --model runs/ground --split data/grounding_test.json --heatmaps 16
    albef-ds eval --task ve --model ALBEF_ve.pth --config albef-base --set data.tokenizer=BERT_DIR ...
    torchrun --nproc_per_node 2 -m albef_ds.cli eval --task ve ...   (same numbers, split over ranks)

``--model``: an export directory (model.pt + config.yaml), a run or checkpoint directory
(consolidated first), or a weights file (a reference ALBEF fine-tuned ``.pth``, with
``--config``). Prints the accuracy beside chance; ``--out`` gets ``metrics.json`` and
``results.json`` (VQA: the official submission format; VE/NLVR2: per example prediction
and label; grounding: the chosen box), and for grounding ``--heatmaps N`` PNGs of the
Grad-CAM map over the image with the true (green) and chosen (red) boxes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UsageError

#: the tasks evaluated here (retrieval: albef-ds eval-retrieval)
EVAL_TASKS = ("ve", "nlvr2", "vqa", "grounding")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides
    p.add_argument("--task", required=True, choices=EVAL_TASKS, help="downstream task")
    p.add_argument("--model", required=True, help="export dir, run dir, checkpoint dir, or weights file (with --config)")
    p.add_argument("--config", default=None, help="config (default: the export's or run's config.yaml)")
    add_overrides(p, "override a value of the model's saved config (repeatable)")
    p.add_argument("--split", required=True, help="annotation JSON of the split to evaluate")
    p.add_argument("--out", default=None, help="directory for metrics.json, results.json (and heatmaps/)")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N",
                   help="grounding: save the first N Grad-CAM maps as PNGs under --out/heatmaps")


def _config_path(model: Path, config: str | None) -> str:
    if config:
        return config
    for candidate in (model / "config.yaml", model.parent.parent / "config.yaml", model.parent.parent.parent / "config.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise UsageError(f"--model {model}: no config.yaml beside it: give --config")


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..config import load_config
    from ..objectives import objective_class
    from ..tokenizer import load_tokenizer
    from ..train.export import load_saved_config, resolve_init
    from ..train.stop import EVALUATION_INTERRUPT_NOTE, StopFlag
    from ..train.trainer import build_model, make_objective

    stop = StopFlag(interrupt_note=EVALUATION_INTERRUPT_NOTE)  # read between batches
    launch = dist_lib.read_launch_env()
    if launch.world_size > 1:
        dist_lib.init_distributed("gloo" if not torch.cuda.is_available() else "auto")
    model_path = Path(args.model)
    if not model_path.exists():
        raise UsageError(f"--model {model_path}: not found")
    overrides = [f"train.objective={args.task}", *args.overrides]
    # the model's own config.yaml: its text form as saved (build_model refuses another)
    cfg = (load_config(args.config, overrides) if args.config
           else load_saved_config(_config_path(model_path, None), overrides))
    # what the config and the files show wrong is said before the model is built
    if not Path(args.split).is_file():
        raise UsageError(f"--split {args.split}: file not found")
    objective_class(args.task).check_settings(cfg, evaluates=True)
    if (model_path / "best.json").is_file():  # a fine-tuning run: its best checkpoint, not its last
        model_path = model_path / "checkpoints" / json.loads((model_path / "best.json").read_text())["tag"]
        if launch.rank == 0:
            print(f"evaluating the run's best checkpoint: {model_path}")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg.model.vocab_size = len(tokenizer)
    objective = make_objective(cfg, tokenizer)
    # only read: a run's checkpoint is consolidated in memory by each rank, not exported into it
    cfg.checkpoint.init_from = resolve_init(str(model_path), "--model")
    log = print if launch.rank == 0 else (lambda *a, **k: None)
    model = build_model(cfg, log, objective, trained_heads=True)
    device = dist_lib.device() if launch.world_size > 1 else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model.to(device)
    evaluator = objective.evaluator_for(args.split, log)
    log(f"evaluating {args.task} on {len(evaluator.examples)} examples", flush=True)
    metrics = evaluator(model, device, stop)
    records = gather_records(evaluator.records)
    if launch.rank == 0:
        print(f"{args.split}: {evaluator.headline(metrics)}")
        if args.out:
            write_outputs(Path(args.out), metrics, records, evaluator, args.heatmaps)
    return 0


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's per-example records, in rank order (without tensors)."""
    from ..distributed import all_gather_object
    plain = [{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for r in records]
    return [r for part in all_gather_object(plain) for r in part]


def write_outputs(out: Path, metrics: dict, records: list[dict], evaluator, heatmaps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    keys = getattr(evaluator, "results_keys", None)
    results = [{k: r[k] for k in keys} for r in records] if keys else records
    (out / "results.json").write_text(json.dumps(results))
    print(f"wrote {out / 'metrics.json'} and {out / 'results.json'} ({len(results)} results)")
    if heatmaps:
        from ..eval.heatmap import save_heatmap
        folder = out / "heatmaps"
        folder.mkdir(exist_ok=True)
        saved = [r for r in evaluator.records if "map" in r][:heatmaps]  # this rank's: the first chunks
        for i, r in enumerate(saved):
            save_heatmap(folder / f"{i:04d}.png", evaluator.image_root / r["image"], r["map"], r["text"],
                         r["truth"], r["box"])
        print(f"wrote {len(saved)} heat maps to {folder}")
