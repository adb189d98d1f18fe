"""Masked language modelling conditioned on the image, with momentum distillation."""
from __future__ import annotations

import torch

from .. import losses
from .itc import Encoded


def mask_inputs(text_ids, tokenizer, cfg, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels) with the tokenizer's special ids (never literal numbers)."""
    return losses.mask_tokens(text_ids, cfg.model.vocab_size, mask_token_id=tokenizer.mask_token_id,
                              pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                              probability=cfg.model.mlm_probability, generator=generator)


def global_normalizer(mlm_labels, world_gather, world_size: int) -> torch.Tensor:
    """The world's masked-token count / world size: with it each rank's loss sums to the
    loss of one process holding the global batch (train.mlm_global_normalization)."""
    count = world_gather.sum((mlm_labels != losses.IGNORE_INDEX).sum().float())
    return count.clamp(min=1) / world_size


def masked_lm(model, mlm_ids, mlm_labels, text_mask, enc: Encoded, image_kvs, alpha, normalizer) -> torch.Tensor:
    """The momentum model reads the momentum image tokens, as the reference's does."""
    with model.phase("mlm"):
        if image_kvs is not None:
            logits = model.mlm_logits(mlm_ids, text_mask, labels=mlm_labels, image_kvs=image_kvs)
        else:
            logits = model.mlm_logits(mlm_ids, text_mask, enc.image_embeds, labels=mlm_labels)
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                logits_m = model.mlm_logits(mlm_ids, text_mask, enc.image_embeds_m, labels=mlm_labels,
                                            momentum=True)
        labels = mlm_labels[mlm_labels != losses.IGNORE_INDEX] if logits.dim() == 2 else mlm_labels
        return losses.mlm_loss(logits, labels, logits_m, alpha, normalizer)
