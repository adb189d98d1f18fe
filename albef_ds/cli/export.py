"""``albef-ds export CKPT``: one fp32 model from a (ZeRO-sharded) training checkpoint:
``model.pt`` (our layout), ``albef.pth`` (the reference release's layout), ``config.yaml``
and a copy of the tokenizer, in ``RUN/exports/step_N/`` (outside ``checkpoints/``, so
checkpoint rotation leaves it alone)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoints/step_N) or a run directory "
                                      "(its latest complete checkpoint)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/exports/step_N)")
    p.add_argument("--config", default=None, help="the run's config (default: RUN/config.yaml)")


def run(args) -> int:
    from ..config import load_config
    from ..train.export import export_checkpoint, resolve_checkpoint
    tag_dir = resolve_checkpoint(args.checkpoint)
    config_path = Path(args.config) if args.config else tag_dir.parent.parent / "config.yaml"
    cfg = load_config(config_path)
    out = export_checkpoint(tag_dir, cfg, Path(args.out) if args.out else None)
    print(f"exported {tag_dir} -> {out / 'model.pt'} (our layout) and {out / 'albef.pth'} (ALBEF layout)")
    if (out / "tokenizer").is_dir():
        print(f"  with config.yaml and a copy of the tokenizer: {out / 'tokenizer'}")
    else:
        print(f"  note: the config's tokenizer {cfg.data.tokenizer} was not found: not copied into the export")
    return 0
