"""Image-text contrastive learning with momentum distillation and the feature queue.

:func:`encode` runs both encoders and their momentum copies once per micro-step and
gathers the pool's momentum features; :func:`contrastive` is the ITC term (candidates:
the pool's or this rank's batch, then the queue) and advances the queue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import losses


@dataclass
class Encoded:
    """One batch through the online encoders and (no grad) their momentum copies."""
    image_embeds: torch.Tensor
    image_feat: torch.Tensor
    text_embeds: torch.Tensor
    text_feat: torch.Tensor
    image_embeds_m: torch.Tensor
    image_feat_m: torch.Tensor
    text_feat_m: torch.Tensor
    #: the pool's momentum features and image ids (rank order), gathered once per micro-step
    image_feat_m_all: torch.Tensor
    text_feat_m_all: torch.Tensor
    ids_all: Optional[torch.Tensor]


def encode(model, images, text_ids, text_mask, image_ids, gather) -> Encoded:
    with model.phase("image_encoder"):
        image_embeds = model.encode_image(images)
        image_feat = model.image_feat(image_embeds)
    with model.phase("text_encoder"):
        text_embeds = model.encode_text(text_ids, text_mask)
        text_feat = model.text_feat(text_embeds, text_mask)
    with torch.no_grad(), model.phase("momentum_and_gathers"):
        image_embeds_m = model.encode_image(images, momentum=True)
        image_feat_m = model.image_feat(image_embeds_m, momentum=True)
        text_feat_m = model.text_feat(model.encode_text(text_ids, text_mask, momentum=True), text_mask,
                                      momentum=True)
        # One gather per micro-step: the pool's momentum features feed the queue on every
        # rank of the pool (so its queues never diverge) and the in-batch candidates.
        image_feat_m_all = gather.gather(image_feat_m)
        text_feat_m_all = gather.gather(text_feat_m)
        ids_all = gather.gather(image_ids) if image_ids is not None else None
    return Encoded(image_embeds, image_feat, text_embeds, text_feat, image_embeds_m, image_feat_m,
                   text_feat_m, image_feat_m_all, text_feat_m_all, ids_all)


def contrastive(model, enc: Encoded, image_ids, alpha: float, gather) -> dict:
    """ITC loss (+ momentum distillation over the queue), the queue advanced, and the mean
    positive / negative cosine of the in-batch candidates."""
    cfg, temp = model.cfg, model.temp
    bs = enc.image_feat.shape[0]
    pooled = cfg.itc_candidates == "pool"
    with torch.no_grad():
        if pooled:
            batch_image_m, batch_text_m, offset = enc.image_feat_m_all, enc.text_feat_m_all, gather.rank * bs
        else:
            batch_image_m, batch_text_m, offset = enc.image_feat_m, enc.text_feat_m, 0
        image_cands = torch.cat([batch_image_m, model.image_queue.t().to(batch_image_m.dtype)])
        text_cands = torch.cat([batch_text_m, model.text_queue.t().to(batch_text_m.dtype)])
        sim_dtype = losses.at_least_fp32_dtype(image_cands.dtype)
        if cfg.itc_id_positives and image_ids is not None:
            batch_ids = enc.ids_all if pooled else image_ids
            pos_targets = losses.id_targets(image_ids, torch.cat([batch_ids, model.idx_queue[0]]), sim_dtype)
        else:
            pos_targets = losses.diagonal_targets(bs, image_cands.shape[0], offset, enc.image_feat.device, sim_dtype)
    with model.phase("itc"):
        loss, sim_i2t, _ = losses.itc_loss(enc.image_feat, enc.text_feat, enc.image_feat_m, enc.text_feat_m,
                                           image_cands, text_cands, pos_targets, temp, alpha)
        # The queues share one pointer: earlier writes advance a copy, the last the pointer.
        if cfg.itc_id_positives and enc.ids_all is not None:
            losses.enqueue(model.idx_queue, model.queue_ptr.clone(), enc.ids_all[:, None])
        losses.enqueue(model.image_queue, model.queue_ptr.clone(), enc.image_feat_m_all)
        losses.enqueue(model.text_queue, model.queue_ptr, enc.text_feat_m_all)
    with torch.no_grad():
        rows = torch.arange(bs, device=sim_i2t.device)
        cos = sim_i2t[:, : batch_text_m.shape[0]].detach() * temp.detach()
        pos = cos[rows, offset + rows]
        neg_sim = (cos.sum() - pos.sum()) / max(cos.numel() - bs, 1)
    return {"loss_itc": loss, "pos_sim": pos.mean(), "neg_sim": neg_sim}
