"""Image-text matching on hard negatives drawn from the contrastive similarities.

Negatives come from this rank's batch (``model.itm_negatives: local``, the reference) or
from the negatives pool; pooled image embeddings travel as the drawn rows only, with
their gradient back to the rank that encoded them (``itm_exchange: rows``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import losses
from .itc import Encoded


@torch.no_grad()
def draw_negatives(model, enc: Encoded, image_ids, gather, generator,
                   random_share: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative image index, negative text index) per row, as indices into the ITM
    candidates. Images are drawn first, as the reference does, so one generator seed
    reproduces the reference's draws. ``random_share``: the share of uniform draws
    (default ``model.itm_random_negatives``; :func:`random_share_at` gives it by step)."""
    cfg, temp = model.cfg, model.temp
    bs = enc.image_feat.shape[0]
    pooled = cfg.itm_negatives == "pool"
    pos_idx = (gather.rank * bs if pooled else 0) + torch.arange(bs, device=enc.image_feat.device)
    with model.phase("itm_sampling"):
        cand_text_m = enc.text_feat_m_all if pooled else enc.text_feat_m
        cand_image_m = enc.image_feat_m_all if pooled else enc.image_feat_m
        cand_ids = (enc.ids_all if pooled else image_ids) if image_ids is not None else None
        mix = cfg.itm_random_negatives if random_share is None else random_share
        w_t2i, _ = losses.itm_weights(enc.text_feat @ cand_image_m.t() / temp, pos_idx, image_ids, cand_ids, mix)
        w_i2t, _ = losses.itm_weights(enc.image_feat @ cand_text_m.t() / temp, pos_idx, image_ids, cand_ids, mix)
        neg_image_idx = losses.sample_negatives(w_t2i, generator, cfg.itm_vectorized_sampling)
        neg_text_idx = losses.sample_negatives(w_i2t, generator, cfg.itm_vectorized_sampling)
    return neg_image_idx, neg_text_idx


def random_share_at(step: int, cfg) -> float:
    """The share of random ITM negatives at optimizer step ``step``: ``itm_random_negatives``
    throughout, or for the first ``itm_random_negatives_steps`` steps and hard ones after."""
    n = cfg.itm_random_negatives_steps
    return cfg.itm_random_negatives if n <= 0 or step < n else 0.0


def matching(model, enc: Encoded, text_ids, text_mask, neg_image_idx, neg_text_idx, gather) -> dict:
    """ITM loss and accuracy over [positives; (text, negative image); (negative text, image)]
    labelled 1, 0, 0; ``image_kvs``: the images' cross-attention keys/values when shared
    (MLM reuses them)."""
    cfg = model.cfg
    bs = enc.image_embeds.shape[0]
    image_embeds, text_embeds = enc.image_embeds, enc.text_embeds
    with model.phase("itm_fusion"):
        if cfg.itm_negatives == "pool":
            # Negative texts travel as ids (cheap) and are re-encoded here.
            if cfg.itm_exchange == "rows":
                image_embeds_neg = gather.select_rows(image_embeds, neg_image_idx)
            else:  # every rank's embeddings: the O(pool) reference of the tests
                image_embeds_neg = gather.gather_with_grad(image_embeds)[neg_image_idx]
            tokens = gather.select_rows(torch.cat([text_ids, text_mask], dim=1), neg_text_idx,
                                        kind="negative_texts")
            neg_ids, neg_mask = tokens.split(text_ids.shape[1], dim=1)
            text_embeds_neg = model.encode_text(neg_ids, neg_mask)
            neg_kvs_of = lambda kvs: model.cross_kv(image_embeds_neg)  # noqa: E731
        else:
            image_embeds_neg = image_embeds[neg_image_idx]
            neg_mask = text_mask[neg_text_idx]
            text_embeds_neg = text_embeds[neg_text_idx]
            neg_kvs_of = lambda kvs: [(k[neg_image_idx], v[neg_image_idx]) for k, v in kvs]  # noqa: E731
        itm_text = torch.cat([text_embeds, text_embeds, text_embeds_neg])
        itm_mask = torch.cat([text_mask, text_mask, neg_mask])
        image_kvs = None
        if cfg.share_cross_kv:
            image_kvs = model.cross_kv(image_embeds)
            itm_kvs = [(torch.cat([k, kn, k]), torch.cat([v, vn, v]))
                       for (k, v), (kn, vn) in zip(image_kvs, neg_kvs_of(image_kvs))]
            fused = model.fuse(itm_text, itm_mask, image_kvs=itm_kvs)
        else:
            fused = model.fuse(itm_text, itm_mask, image_embeds=torch.cat([image_embeds, image_embeds_neg, image_embeds]))
        logits = model.itm_logits(fused)
        labels = torch.cat([torch.ones(bs, dtype=torch.long, device=fused.device),
                            torch.zeros(2 * bs, dtype=torch.long, device=fused.device)])
        loss = losses.itm_loss(logits, labels)
    with torch.no_grad():
        acc = (logits.argmax(dim=1) == labels).to(losses.at_least_fp32(logits).dtype).mean()
    return {"loss_itm": loss, "itm_acc": acc, "image_kvs": image_kvs}
