"""The Objective seam: what one training objective owns, and what the Trainer hands it.

An objective turns a loader batch into model inputs (:meth:`Objective.prepare`: device
transfer, masking, negatives' generator, alpha, normalisers) and computes named losses and
detached diagnostics from the model's components (:meth:`Objective.compute`, run inside
the engine's forward so ZeRO-3 sees one forward per micro-step). The Trainer sums nothing
itself: it backpropagates ``out["loss"]`` and logs the keys the objective declares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """Where the loop stands at one micro-step, and the collectives the objective may use."""
    step: int
    micro: int
    epoch: int
    steps_per_epoch: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    #: a function of (train.seed, step, micro, rank): resumed runs draw what uninterrupted ones did
    seed: int
    generator: torch.Generator
    #: the negatives pool's gather (albef_ds.gather protocol) and the whole world's
    gather: object
    world_gather: object


class Objective:
    #: registry name (albef_ds.objectives.OBJECTIVES)
    name = ""
    #: scalar outputs averaged between log lines (metrics.jsonl, TensorBoard)
    log_keys: tuple = ("loss",)
    #: the few keys shown on the progress bar
    progress_keys: tuple = ("loss",)
    #: config values this objective needs, applied before the model is built
    config_overrides: tuple = ()

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        """Keyword arguments of :meth:`compute` for this micro-batch."""
        raise NotImplementedError

    def compute(self, model, **inputs) -> dict:
        """``{"loss": scalar with grad, <log key>: detached scalar, ...}``."""
        raise NotImplementedError

    def make_evaluator(self, cfg, tokenizer):
        """The evaluation run on data.val_dir during training (None: none). Retrieval by default."""
        if not cfg.data.val_dir:
            return None
        from ..eval.evaluator import RetrievalEvaluator
        return RetrievalEvaluator(cfg, cfg.data.val_dir, tokenizer)


def alpha_at(step: int, steps_per_epoch: int, alpha: float, ramp_epochs: float) -> float:
    """Distillation weight: linear from 0 to ``alpha`` over the first ``ramp_epochs``."""
    ramp = ramp_epochs * steps_per_epoch
    if ramp <= 0:
        return alpha
    return alpha * min(1.0, step / ramp)


def images_and_texts(batch: dict, ctx: StepContext) -> dict:
    """The pair batch on the device: images in the engine's dtype."""
    return {"images": batch["image"].to(ctx.device, dtype=ctx.dtype, non_blocking=True),
            "text_ids": batch["text_ids"].to(ctx.device, non_blocking=True),
            "text_mask": batch["text_mask"].to(ctx.device, non_blocking=True),
            "image_ids": batch["image_id"].to(ctx.device, non_blocking=True)}
