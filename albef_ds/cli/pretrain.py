"""``albef-ds pretrain``: ALBEF pretraining on a DeepSpeed engine, under any launcher.

    deepspeed --num_gpus 8 -m albef_ds.cli pretrain --config albef-base
    torchrun --nproc_per_node 8 -m albef_ds.cli pretrain --config ...
    srun albef-ds pretrain --config ...          (SLURM variables mapped in albef_ds/distributed.py)
    albef-ds pretrain --config tiny              (one rank)

The loop is the Trainer's (albef_ds/train/trainer.py); the objective is train.objective
(pretrain: ITC + ITM + MLM). SIGUSR1/SIGTERM/SIGINT ask for a stop: the ranks agree on one
step, save, and exit with status 3 (the batch script requeues on it).
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides, add_run_dir
    p.add_argument("--config", required=True, help="YAML config or preset name (tiny, mid, albef-base)")
    add_overrides(p)
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in the run dir), 'none', or a checkpoint "
                        "directory; default: checkpoint.resume from the config")
    add_run_dir(p)
    add_overwrite_argument(p)


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds an earlier run: its checkpoints, "
                        "exports, metrics and TensorBoard logs are deleted first (implies --resume none)")


def resume_mode(args, default: str) -> str:
    """--resume (or ``default``), 'none' with --overwrite; the two cannot disagree."""
    if getattr(args, "overwrite", False):
        if args.resume not in (None, "none"):
            from ..errors import UsageError
            raise UsageError(f"--overwrite starts afresh (--resume none); it cannot be combined with "
                             f"--resume {args.resume}")
        return "none"
    return args.resume or default


def start(args, extra_overrides=(), need_val: bool = False, init_tokenizer: str | None = None):
    """(cfg, launch, stop flag): the stop handlers first (a signal during start-up asks for
    a stop too), then the config checked before any work (the data, the tokenizer and the
    objective's settings: a missing file is one line before a model is built or the run
    directory locked), then the process group. ``init_tokenizer``: the tokenizer of the
    weights fine-tuning starts from, used (and said) when the config names none."""
    import warnings

    from .. import distributed as dist_lib
    from ..config import ConfigError, load_config
    from ..train.stop import StopFlag
    from ..train.trainer import check_data
    stop = StopFlag()
    # DeepSpeed calls collectives that torch marks deprecated, once per step per rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    overrides = list(extra_overrides) + list(args.overrides)
    if args.run_dir:
        overrides.append(f"logging.run_dir={args.run_dir}")
    launch = dist_lib.read_launch_env()
    cfg = load_config(args.config, overrides, world_size=launch.world_size)
    if not cfg.data.tokenizer and init_tokenizer:
        cfg.data.tokenizer = init_tokenizer
        if launch.rank == 0:
            print(f"note: data.tokenizer: {init_tokenizer} (the one --init was trained with)", flush=True)
    has_val = bool(cfg.data.val_dir or cfg.task.val_file)
    if need_val and not has_val:
        raise ConfigError("config key 'data.val_dir' (retrieval) or 'task.val_file' (other tasks): "
                          "fine-tuning needs a validation split to pick the best epoch")
    check_data(cfg, evaluates=has_val and (need_val or bool(cfg.eval.every_steps)))
    note = cfg.recipe_note(launch.world_size)
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    if note and launch.is_main:
        print(note)
    return cfg, launch, stop


def run(args) -> int:
    from ..train.trainer import train
    cfg, launch, stop = start(args)
    resume = resume_mode(args, cfg.checkpoint.resume)
    return train(cfg, launch, resume, stop=stop, overwrite=getattr(args, "overwrite", False))
