"""``albef-ds finetune-retrieval``: ALBEF's retrieval fine-tuning from a pretrained model.

    albef-ds finetune-retrieval --config tiny --init runs/demo/export \\
        --set data.train_dirs=[data/flickr_train_shards] --set data.val_dir=data/flickr/val.json \\
        --set model.image_res=384

Differences from pretraining (ALBEF_FACTS.md): ITC positives are every pair of the same
image id (ids queued with the features), ITM negatives never share the image id, no MLM,
a new resolution (position embeddings resampled when the weights load), evaluation on the
val split after each epoch, and the best checkpoint kept (``RUN_DIR/best.json``).
Training pairs come as MDS shards (``albef-data convert`` reads ALBEF's train JSON); their
image ids derive from the image content, so captions of one image share an id.
"""
from __future__ import annotations

import argparse

from ..config import load_config

FINETUNE_OVERRIDES = ["model.itc_id_positives=true", "model.mlm=false"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config or preset name")
    p.add_argument("--init", required=True, help="pretrained weights: an export directory (model.pt), "
                                                 "a run/checkpoint directory, or a reference ALBEF .pth")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", default="auto")


def resolve_init(path: str) -> str:
    """A checkpoint or run directory is consolidated into an export first (rank 0)."""
    from pathlib import Path
    p = Path(path)
    if p.is_file() or (p / "model.pt").is_file():
        return str(p / "model.pt") if p.is_dir() else str(p)
    from ..train.export import consolidate, resolve_checkpoint, save_exported
    tag_dir = resolve_checkpoint(path)
    out = tag_dir / "export"
    if not (out / "model.pt").is_file():
        cfg = load_config(tag_dir.parent.parent / "config.yaml")
        save_exported(consolidate(tag_dir, cfg), cfg, out)
    return str(out / "model.pt")


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..train.pretrain import _check_data_dirs, train

    overrides = FINETUNE_OVERRIDES + list(args.overrides)
    if args.run_dir:
        overrides.append(f"logging.run_dir={args.run_dir}")
    launch = dist_lib.read_launch_env()
    cfg = load_config(args.config, overrides, world_size=launch.world_size)
    _check_data_dirs(cfg)
    if not cfg.data.val_dir:
        raise SystemExit("finetune-retrieval needs data.val_dir (a retrieval JSON) to pick the best epoch")
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    if launch.rank == 0:
        cfg.checkpoint.init_from = resolve_init(args.init)
    dist_lib.barrier()
    if launch.rank != 0:
        cfg.checkpoint.init_from = resolve_init(args.init)  # the export exists now
    return train(cfg, launch, args.resume, eval_each_epoch=True, keep_best=True)
