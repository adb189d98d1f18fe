"""ALBEF pretraining: ITC (+MoD, queue) + ITM on hard negatives + MLM (+MoD).

The loss is their sum (the paper's, unweighted). Per micro-step the Trainer's generator
(seeded by seed, step, micro-step and rank) masks the tokens and draws the ITM negatives,
so a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..gather import SINGLE_PROCESS
from . import itc, itm, mlm
from .base import Objective, StepContext, alpha_at, images_and_texts

#: the reference's bounds on the contrastive temperature
TEMP_BOUNDS = (0.001, 0.5)


def albef_forward(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                  mlm_ids: Optional[torch.Tensor] = None, mlm_labels: Optional[torch.Tensor] = None,
                  alpha: float = 0.0, image_ids: Optional[torch.Tensor] = None, gather=SINGLE_PROCESS,
                  itm_negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                  generator: Optional[torch.Generator] = None,
                  mlm_normalizer: Optional[torch.Tensor] = None,
                  itm_random_share: Optional[float] = None,
                  itm_swap: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict:
    """One ALBEF training forward (call as ``model(albef_forward, ...)`` so that engines see
    the module's forward). ``itm_negatives``: fixed (negative text index, negative image
    index) per row into the ITM candidates; by default they are drawn (``itm_random_share``
of them uniformly: :func:`itm.random_share_at`); ``itm_swap``: (swapped ids, rows) of
:func:`itm.swap_words`, those rows' negative texts. Without ``mlm_ids``
    or with ``model.mlm`` off, no MLM term. Returns losses and detached diagnostics."""
    with torch.no_grad():  # the reference clamps in its forward; the Trainer clamps the master too
        model.temp.clamp_(*TEMP_BOUNDS)
    enc = itc.encode(model, images, text_ids, text_mask, image_ids, gather)
    out = itc.contrastive(model, enc, image_ids, alpha, gather)
    if itm_negatives is None:
        neg_image_idx, neg_text_idx = itm.draw_negatives(model, enc, image_ids, gather, generator,
                                                             itm_random_share)
    else:
        neg_text_idx, neg_image_idx = itm_negatives
    swap_ids, swap_rows = itm_swap if itm_swap is not None else (None, None)
    matched = itm.matching(model, enc, text_ids, text_mask, neg_image_idx, neg_text_idx, gather,
                           swap_ids, swap_rows)
    image_kvs = matched.pop("image_kvs")
    out.update(matched)
    if model.cfg.mlm and mlm_ids is not None:
        out["loss_mlm"] = mlm.masked_lm(model, mlm_ids, mlm_labels, text_mask, enc, image_kvs, alpha, mlm_normalizer)
    else:
        out["loss_mlm"] = out["loss_itc"].new_zeros(())
    out["loss"] = out["loss_itc"] + out["loss_itm"] + out["loss_mlm"]
    out.update({"neg_text_idx": neg_text_idx, "neg_image_idx": neg_image_idx,
                "image_feat_m_all": enc.image_feat_m_all, "text_feat_m_all": enc.text_feat_m_all})
    return out


class PretrainObjective(Objective):
    name = "pretrain"
    log_keys = ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc", "pos_sim", "neg_sim", "alpha")
    progress_keys = ("loss", "loss_itc", "loss_itm", "loss_mlm")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.swap_group_of = None
        if cfg.model.itm_swap_negatives > 0:
            self.log_keys = (*self.log_keys, "itm_swap_acc")
            if tokenizer is not None:  # None: a model built to load or export, never trained
                self.swap_group_of = itm.swap_groups(tokenizer, cfg.model.itm_swap_words, len(tokenizer))

    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        cfg = self.cfg
        inputs = images_and_texts(batch, ctx)
        if self.swap_group_of is not None:
            # before the MLM masking: runs without swaps keep their generator stream
            swap_ids, rows = itm.swap_words(batch["text_ids"], self.swap_group_of, cfg.model.itm_swap_negatives,
                                            ctx.generator)
            inputs["itm_swap"] = (swap_ids.to(ctx.device, non_blocking=True), rows.to(ctx.device))
        if cfg.model.mlm:
            inputs["mlm_ids"], inputs["mlm_labels"] = mlm.mask_inputs(inputs["text_ids"], self.tokenizer, cfg,
                                                                      ctx.generator)
            if cfg.train.mlm_global_normalization:
                inputs["mlm_normalizer"] = mlm.global_normalizer(inputs["mlm_labels"], ctx.world_gather,
                                                                 ctx.world_size)
        inputs.update(alpha=alpha_at(ctx.step, ctx.steps_per_epoch, cfg.model.alpha, cfg.train.alpha_ramp_epochs),
                      gather=ctx.gather, generator=ctx.generator,
                      itm_random_share=itm.random_share_at(ctx.step, cfg.model))
        return inputs

    def compute(self, model, **inputs) -> dict:
        out = albef_forward(model, **inputs)
        out["alpha"] = out["loss"].new_tensor(inputs["alpha"])
        return out
