"""Retrieval evaluation inside a training run (zero-shot during pretraining, per epoch
while fine-tuning), on every rank, with the model the engine trains."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config


def split_path(value: str) -> Path:
    """data.val_dir / data.test_dir: a retrieval JSON, or a directory holding val.json."""
    p = Path(value)
    if p.is_dir():
        for name in ("val.json", "test.json"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no val.json or test.json in this directory")
    if not p.is_file():
        raise FileNotFoundError(f"retrieval split not found: {p}")
    return p


class RetrievalEvaluator:
    def __init__(self, cfg: Config, split: str, tokenizer, max_images: int | None = None):
        from .retrieval_cmd import make_io, read_split
        self.cfg = cfg
        path = split_path(split)
        self.split = read_split(path, cfg.data.max_words, max_images or cfg.eval.max_images)
        self.load_images, self.tokenize = make_io(cfg, self.split, path.parent, tokenizer)

    def __call__(self, model, device: torch.device, zero_stage: int = 0) -> dict:
        from .retrieval import evaluate
        from ..distributed import all_reduce_sum
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        gathered = contextlib.nullcontext()
        if zero_stage == 3:  # partitioned weights: gather them for the evaluation's forwards
            import deepspeed
            gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
        was_training = model.training
        with gathered:
            metrics = evaluate(model, self.split, self.load_images, self.tokenize, self.cfg.eval.k_test,
                               self.cfg.eval.batch_size, rank, world, all_reduce_sum, device)
        model.train(was_training)
        return metrics
