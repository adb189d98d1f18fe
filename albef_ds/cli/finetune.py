"""``albef-ds finetune --task retrieval``: fine-tune a pretrained model on a downstream task.

    albef-ds finetune --task retrieval --config tiny --init runs/demo/export \\
        --set data.train_dirs=[data/flickr_train_shards] --set data.val_dir=data/flickr/val.json \\
        --set model.image_res=384

The task is an objective of the Trainer (albef_ds/objectives/<task>.py); retrieval: ITC
positives by image id, ITM negatives of other images, no MLM (ALBEF_FACTS.md), evaluated
on data.val_dir after each epoch with the best checkpoint kept (``RUN_DIR/best.json``).
Training pairs come as MDS shards (``albef-data convert`` reads ALBEF's train JSON).
"""
from __future__ import annotations

import argparse

#: task -> objective (albef_ds.objectives.OBJECTIVES)
TASKS = {"retrieval": "retrieval", "ve": "ve"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="retrieval", choices=sorted(TASKS), help="downstream task (default: retrieval)")
    p.add_argument("--config", required=True, help="YAML config or preset name")
    p.add_argument("--init", required=True, help="pretrained weights: an export directory (model.pt), "
                                                 "a run/checkpoint directory, or a reference ALBEF .pth")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", default=None, help="'auto' (default: the latest complete checkpoint of this "
                                                  "fine-tuning run, if any), 'none', or a checkpoint directory")
    from .pretrain import add_overwrite_argument
    add_overwrite_argument(p)


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..train.export import resolve_init
    from ..train.trainer import train
    from .pretrain import resume_mode, start
    resume = resume_mode(args, "auto")
    cfg, launch, stop = start(args, [f"train.objective={TASKS[getattr(args, 'task', 'retrieval')]}"], need_val=True)
    if launch.rank == 0:
        cfg.checkpoint.init_from = resolve_init(args.init)
    dist_lib.barrier()
    if launch.rank != 0:
        cfg.checkpoint.init_from = resolve_init(args.init)  # the export exists now
    return train(cfg, launch, resume, eval_each_epoch=True, keep_best=True, stop=stop, overwrite=args.overwrite)
