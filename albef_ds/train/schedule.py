"""The learning-rate schedule, by optimizer step (the distillation ramp is the objectives': albef_ds.objectives.base.alpha_at)."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, warmup_lr: float, min_lr: float,
          warmup_steps: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine decay
    to ``min_lr`` at ``total_steps`` (ALBEF's recipe, by steps rather than epochs)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / max(1, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_lambda(total_steps: int, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int):
    """Multiplier for torch.optim.lr_scheduler.LambdaLR with base lr ``lr``."""
    return lambda step: lr_at(step, total_steps, lr, warmup_lr, min_lr, warmup_steps) / lr
