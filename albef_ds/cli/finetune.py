"""``albef-ds finetune --task TASK``: fine-tune a pretrained model on a downstream task.

    albef-ds finetune --task retrieval --config tiny --init runs/demo/export \\
        --set data.train_dirs=[data/flickr_train_shards] --set data.val_dir=data/flickr/val.json
    albef-ds finetune --task ve --config tiny --init runs/demo/run \\
        --set task.train_files=[data/ve_train.json] --set task.val_file=data/ve_dev.json
    albef-ds finetune --task nlvr_ta --config tiny --init runs/demo/run --set data.train_dirs=[...]
    albef-ds finetune --task nlvr2 --config tiny --init runs/nlvr_ta \\
        --set task.train_files=[data/nlvr_train.json] --set task.val_file=data/nlvr_dev.json

Each task is an objective of the Trainer (albef_ds/objectives/<task>.py), trained under any
launcher like pretraining (same checkpoints, resume, metrics). Tasks with a validation
split are evaluated after each epoch and the best checkpoint is kept (``RUN_DIR/best.json``).
docs/tasks.md: the data each task needs and where users get it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

#: task -> (objective in albef_ds.objectives.OBJECTIVES, evaluated on a validation split)
TASKS = {"retrieval": ("retrieval", True), "ve": ("ve", True), "nlvr2": ("nlvr2", True),
         "nlvr_ta": ("nlvr_ta", False), "vqa": ("vqa", True), "grounding": ("grounding", True)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides, add_run_dir
    p.add_argument("--task", default="retrieval", choices=sorted(TASKS),
                   help="downstream task (default: retrieval); nlvr_ta: NLVR2's text-assignment stage "
                        "on pretraining pairs")
    p.add_argument("--config", required=True, help="YAML config or preset name")
    p.add_argument("--init", required=True, help="pretrained weights: an export directory (model.pt), "
                                                 "a run/checkpoint directory, or a reference ALBEF .pth")
    add_overrides(p)
    add_run_dir(p)
    p.add_argument("--resume", default=None, help="'auto' (default: the latest complete checkpoint of this "
                                                  "fine-tuning run, if any), 'none', or a checkpoint directory")
    from .pretrain import add_overwrite_argument
    add_overwrite_argument(p)


def run(args) -> int:
    from ..train.export import init_tokenizer, resolve_init
    from ..train.trainer import train
    from .pretrain import resume_mode, start
    resume = resume_mode(args, "auto")
    objective, evaluated = TASKS[getattr(args, "task", "retrieval")]
    # --init is only read (a run is consolidated in memory by each rank, not exported into
    # it); checked first, so that a wrong path is the error a user sees
    init_from = resolve_init(args.init, "--init")
    cfg, launch, stop = start(args, [f"train.objective={objective}"], need_val=evaluated,
                              init_tokenizer=init_tokenizer(args.init))
    cfg.checkpoint.init_from = init_from
    note = unfinished_run_note(Path(args.init), cfg.checkpoint.init_from)
    if note and launch.rank == 0:
        print(note, flush=True)
    return train(cfg, launch, resume, eval_each_epoch=evaluated, keep_best=evaluated, stop=stop,
                 overwrite=args.overwrite)


def unfinished_run_note(init: Path, weights: str) -> str | None:
    """A line when ``--init`` names a run directory that has not reached its final step (no
    DONE marker): fine-tuning then starts from whatever checkpoint it last committed.
    ``weights``: that checkpoint's folder, or the model.pt of its export."""
    from ..train.trainer import DONE_MARKER
    if not (init / "checkpoints").is_dir() or (init / DONE_MARKER).is_file():
        return None
    tag = Path(weights).name if Path(weights).is_dir() else Path(weights).parent.name
    return (f"note: --init {init} is an unfinished run (no {DONE_MARKER} marker): fine-tuning starts from its "
            f"newest checkpoint ({tag})")
