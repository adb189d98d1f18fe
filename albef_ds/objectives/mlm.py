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


def bucketed_positions(mlm_labels: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat token indices of the masked positions, their labels), both padded up to a
    multiple of ``bucket`` (at least one bucket): the padding points at token 0 ([CLS],
    never masked) with an ignored label, so the loss and gradients are those of the masked
    positions alone, while the MLM head sees one of a few row counts (model.mlm_masked_bucket)."""
    flat = mlm_labels.reshape(-1)
    positions = (flat != losses.IGNORE_INDEX).nonzero().squeeze(1)
    count = positions.numel()
    pad = max(1, -(-count // bucket)) * bucket - count
    labels = torch.cat([flat[positions], flat.new_full((pad,), losses.IGNORE_INDEX)])
    return torch.cat([positions, positions.new_zeros(pad)]), labels


def masked_lm(model, mlm_ids, mlm_labels, text_mask, enc: Encoded, image_kvs, alpha, normalizer) -> torch.Tensor:
    """The momentum model reads the momentum image tokens, as the reference's does."""
    with model.phase("mlm"):
        bucket = model.cfg.mlm_masked_bucket if model.cfg.mlm_masked_only else 0
        positions = None
        if bucket:
            positions, bucket_labels = bucketed_positions(mlm_labels, bucket)
        if image_kvs is not None:
            logits = model.mlm_logits(mlm_ids, text_mask, labels=mlm_labels, image_kvs=image_kvs, positions=positions)
        else:
            logits = model.mlm_logits(mlm_ids, text_mask, enc.image_embeds, labels=mlm_labels, positions=positions)
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                logits_m = model.mlm_logits(mlm_ids, text_mask, enc.image_embeds_m, labels=mlm_labels,
                                            momentum=True, positions=positions)
        if bucket:
            labels = bucket_labels  # mlm_loss drops the padded rows by their ignored labels
        else:
            labels = mlm_labels[mlm_labels != losses.IGNORE_INDEX] if logits.dim() == 2 else mlm_labels
        return losses.mlm_loss(logits, labels, logits_m, alpha, normalizer)
