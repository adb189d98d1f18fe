"""Evaluation of the downstream tasks (VQA, NLVR2, SNLI-VE, grounding) inside a training
run or from ``albef-ds eval``: the task's examples in fixed chunks over ranks (chunk j on
rank j mod world, as retrieval does, so 2 ranks give exactly 1 rank's numbers), each
chunk scored by the objective, the counts summed over ranks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

#: examples per chunk (one model call)
CHUNK = 32


class TaskEvaluator:
    """``score(model, batch, device) -> (per-example records)``: each record a dict with
    ``correct`` (0/1, or a VQA score in [0, 1]) and whatever the results file should hold.
    ``primary`` is "acc"; ``headline`` prints it beside ``chance``."""

    primary = "acc"

    def __init__(self, name: str, examples: list[dict], load: Callable, collate: Callable,
                 score: Callable, chance: float, batch_size: int = CHUNK):
        self.name, self.examples, self.load, self.collate, self.score = name, examples, load, collate, score
        self.chance, self.batch_size = chance, batch_size
        self.records: list[dict] = []  # this rank's, after a call

    def headline(self, values: dict) -> str:
        groups = "".join(f", {k[4:]} {100 * v:.2f} %" for k, v in values.items() if k.startswith("acc_"))
        return (f"{self.name} accuracy {100 * values['acc']:.2f} % on {values['n']}{groups} "
                f"(chance {100 * values['chance']:.2f} %)")

    def __call__(self, model, device: torch.device, stop=None) -> dict:
        """``stop``: a StopFlag (albef_ds/train/stop.py), read between chunks (``albef-ds
        eval``); a run's own evaluation leaves it out and stops at its next step instead."""
        from ..distributed import all_reduce_sum
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        was_training = model.training
        model.eval()
        self.records = []
        starts = range(0, len(self.examples), self.batch_size)
        for j, start in enumerate(starts):
            if j % world != rank:
                continue
            if stop is not None:
                stop.raise_if_requested(f"the {self.name} evaluation ({start} of {len(self.examples)} examples done)")
            chunk = self.examples[start:start + self.batch_size]
            batch = self.collate([self.load(e, None) for e in chunk])
            self.records += self.score(model, batch, device)
        model.train(was_training)
        # Examples may name a group (grounding: val / testA / testB): accuracy per group too.
        groups = sorted({e["group"] for e in self.examples if e.get("group") is not None})
        sums = [[sum(float(r["correct"]) for r in self.records), float(len(self.records))]]
        sums += [[sum(float(r["correct"]) for r in self.records if r.get("group") == g),
                  float(sum(r.get("group") == g for r in self.records))] for g in groups]
        total = all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device)).cpu()
        correct, n = float(total[0, 0]), int(total[0, 1])
        metrics = {"acc": correct / max(n, 1), "n": n, "chance": self.chance}
        for g, (c, m) in zip(groups, total[1:].tolist()):
            metrics[f"acc_{g}"] = c / max(m, 1)
        return metrics
