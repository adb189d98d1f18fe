"""One fp32 model from a (ZeRO-sharded) training checkpoint.

Online weights come from DeepSpeed's fp32 optimizer partitions (``zero_to_fp32``), the
momentum weights from our fp32 EMA master (the shared file, ZeRO-3 partitions joined from
the rank files one at a time), the queues from pool 0's queue file. Writes ``model.pt`` (our layout, loadable by
:func:`load_exported`) and ``albef.pth`` (the reference release's layout).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, load_config
from .checkpoint import CheckpointManager


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "checkpoints").is_dir():
        found = CheckpointManager(p, 1, 0, 1).resolve("auto")
        if found is None:
            raise FileNotFoundError(f"{p}: no complete checkpoint under {p / 'checkpoints'}")
        return found
    CheckpointManager(p.parent.parent, 1, 0, 1).resolve(str(p))  # raises if incomplete
    return p


def consolidate(tag_dir: Path, cfg: Config) -> torch.nn.Module:
    """An ALBEF (fp32, CPU) holding the checkpoint's weights, momentum masters and queues."""
    from ..objectives import build_task_model
    from .backend import consolidated_fp32_state
    from . import checkpoint as ckpt_lib
    from .ema import assemble_full

    model = build_task_model(cfg)
    state = consolidated_fp32_state(tag_dir)
    momentum = ckpt_lib.read(tag_dir / ckpt_lib.MOMENTUM_FILE)
    state.update(assemble_full(momentum, (f["ema_partitions"] for f in ckpt_lib.rank_files(tag_dir))))
    state.update(ckpt_lib.read_queue(tag_dir, 0))  # pool 0's queues
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied (decoder = word embeddings) and buffer entries may be absent from DeepSpeed's
    # parameter list; anything else missing is a real gap.
    real_missing = [k for k in missing if not k.endswith(("position_ids", "decoder.weight", "decoder.bias"))]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint {tag_dir} does not fit the config's model: "
                           f"missing {real_missing[:10]}, unexpected {unexpected[:10]}")
    return model


def save_exported(model, cfg: Config, out: Path) -> None:
    from ..config import save_config
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, out / "model.pt")
    save_config(cfg, out / "config.yaml")


def load_exported(directory: str | Path):
    """(model, cfg) from an export directory."""
    directory = Path(directory)
    cfg = load_config(directory / "config.yaml")
    from ..objectives import build_task_model
    model = build_task_model(cfg)
    model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=False)["model"])
    return model, cfg


def resolve_init(path: str) -> str:
    """Weights to start a fine-tuning from: a file or an export as they are; a checkpoint or
    run directory is consolidated into ``<checkpoint>/export`` first (call on rank 0)."""
    p = Path(path)
    if p.is_file() or (p / "model.pt").is_file():
        return str(p / "model.pt") if p.is_dir() else str(p)
    tag_dir = resolve_checkpoint(path)
    out = tag_dir / "export"
    if not (out / "model.pt").is_file():
        cfg = load_config(tag_dir.parent.parent / "config.yaml")
        save_exported(consolidate(tag_dir, cfg), cfg, out)
    return str(out / "model.pt")
