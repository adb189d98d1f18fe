"""Retrieval evaluation inside a training run (zero-shot during pretraining, per epoch
while fine-tuning), on every rank, with the model the engine trains. Partitioned (ZeRO-3)
weights are the caller's to gather around the call (the backend's gathered_parameters)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import Config
from .io import make_io, read_split, split_path


class RetrievalEvaluator:
    #: the best checkpoint is the one of the best mean recall after ITM re-ranking (the paper's)
    primary = "itm_r_mean"

    @staticmethod
    def headline(values: dict) -> str:
        return (f"ITM re-ranked TR@1 {values['itm_txt_r1']:.2f} IR@1 {values['itm_img_r1']:.2f} "
                f"r_mean {values['itm_r_mean']:.2f}; ITC TR@1 {values['itc_txt_r1']:.2f} IR@1 "
                f"{values['itc_img_r1']:.2f} (chance TR@1 {values['chance_txt_r1']:.2f})")

    def __init__(self, cfg: Config, split: str, tokenizer, max_images: int | None = None):
        self.cfg = cfg
        path = split_path(split)
        self.split = read_split(path, cfg.data.max_words, max_images or cfg.eval.max_images)
        self.load_images, self.tokenize = make_io(cfg, self.split, path.parent, tokenizer)

    def __call__(self, model, device: torch.device) -> dict:
        from ..distributed import all_reduce_sum
        from .retrieval import evaluate
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        was_training = model.training
        metrics = evaluate(model, self.split, self.load_images, self.tokenize, self.cfg.eval.k_test,
                           self.cfg.eval.batch_size, rank, world, all_reduce_sum, device)
        model.train(was_training)
        return metrics
