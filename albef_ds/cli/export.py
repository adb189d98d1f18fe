"""``albef-ds export CKPT``: one fp32 model from a (ZeRO-sharded) training checkpoint:
``model.pt`` (our layout) and ``albef.pth`` (the reference release's layout)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoints/step_N) or a run directory "
                                      "(its latest complete checkpoint)")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/export)")
    p.add_argument("--config", default=None, help="the run's config (default: RUN/config.yaml)")


def run(args) -> int:
    from ..config import load_config
    from ..train.export import consolidate, resolve_checkpoint, save_exported
    tag_dir = resolve_checkpoint(args.checkpoint)
    config_path = Path(args.config) if args.config else tag_dir.parent.parent / "config.yaml"
    cfg = load_config(config_path)
    model = consolidate(tag_dir, cfg)
    out = Path(args.out) if args.out else tag_dir / "export"
    save_exported(model, cfg, out)
    from ..objectives import reference_layout
    from ..weights import save_albef_pth
    save_albef_pth(model, out / "albef.pth", **reference_layout(cfg))
    print(f"exported {tag_dir} -> {out / 'model.pt'} (our layout) and {out / 'albef.pth'} (ALBEF layout)")
    return 0
