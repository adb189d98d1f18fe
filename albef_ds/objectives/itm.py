"""Image-text matching on hard negatives drawn from the contrastive similarities.

Negatives come from this rank's batch (``model.itm_negatives: local``, the reference) or
from the negatives pool; pooled image embeddings travel as the drawn rows only, with
their gradient back to the rank that encoded them (``itm_exchange: rows``). A share of
negative texts can instead be the row's own caption with two words swapped
(``model.itm_swap_negatives``: :func:`swap_words`).
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


def swap_groups(tokenizer, groups: list, vocab_size: int) -> torch.Tensor:
    """Token id -> the index of its ``model.itm_swap_words`` group (-1: in none)."""
    group_of = torch.full((vocab_size,), -1, dtype=torch.long)
    for g, words in enumerate(groups):
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"model.itm_swap_words[{g}] must be a list of words, got {words!r}")
        for word in words:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"model.itm_swap_words: {word!r} is {len(ids)} tokens of the tokenizer "
                                 f"({tokenizer.convert_ids_to_tokens(ids)}); each word must be one token")
            if group_of[ids[0]] not in (-1, g):
                raise ValueError(f"model.itm_swap_words: {word!r} is in groups {int(group_of[ids[0]])} and {g}")
            group_of[ids[0]] = g
    return group_of


def swap_words(text_ids: torch.Tensor, group_of: torch.Tensor, share: float,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with two words swapped, which rows to use them for). A row qualifies when it
    holds two *different* tokens of one group (two "red"s swapped would be the same
    caption); one such pair of positions is drawn uniformly, and the row is used with
    probability ``share``. Works on the host (the loader's CPU batch); two draws from
    ``generator`` per call whatever the batch, so resumed runs draw the same swaps."""
    bs = text_ids.shape[0]
    device = generator.device if generator is not None else "cpu"
    pick = torch.rand(bs, generator=generator, device=device).cpu()
    use = torch.rand(bs, generator=generator, device=device).cpu() < share
    ids = text_ids.cpu()
    groups = group_of[ids]
    swapped, ok = ids.clone(), torch.zeros(bs, dtype=torch.bool)
    for row in range(bs):
        pairs = []
        for g in groups[row].unique().tolist():
            if g < 0:
                continue
            pos = (groups[row] == g).nonzero().flatten().tolist()
            pairs += [(i, j) for n, i in enumerate(pos) for j in pos[n + 1:] if ids[row, i] != ids[row, j]]
        if pairs:
            i, j = pairs[min(int(pick[row] * len(pairs)), len(pairs) - 1)]
            swapped[row, i], swapped[row, j] = ids[row, j], ids[row, i]
            ok[row] = True
    return swapped.to(text_ids.device), (ok & use).to(text_ids.device)


def matching(model, enc: Encoded, text_ids, text_mask, neg_image_idx, neg_text_idx, gather,
             swap_ids: Optional[torch.Tensor] = None, swap_rows: Optional[torch.Tensor] = None) -> dict:
    """ITM loss and accuracy over [positives; (text, negative image); (negative text, image)]
    labelled 1, 0, 0; ``image_kvs``: the images' cross-attention keys/values when shared
    (MLM reuses them). ``swap_ids``/``swap_rows`` (:func:`swap_words`): those rows' negative
    text is their own caption with words swapped (same mask), and ``itm_swap_acc`` is the
    accuracy on them."""
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
        if swap_ids is not None:
            # the whole batch is encoded (no host sync to pick rows); only swap_rows are used
            text_embeds_neg = torch.where(swap_rows[:, None, None], model.encode_text(swap_ids, text_mask),
                                          text_embeds_neg)
            neg_mask = torch.where(swap_rows[:, None], text_mask, neg_mask)
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
        logits = model.itm_logits(fused, itm_mask)
        labels = torch.cat([torch.ones(bs, dtype=torch.long, device=fused.device),
                            torch.zeros(2 * bs, dtype=torch.long, device=fused.device)])
        loss = losses.itm_loss(logits, labels)
    with torch.no_grad():
        right = (logits.argmax(dim=1) == labels).to(losses.at_least_fp32(logits).dtype)
        out = {"loss_itm": loss, "itm_acc": right.mean(), "image_kvs": image_kvs}
        if swap_ids is not None:  # 0 on a (rare) batch without swapped rows: no NaN in the log sums
            rows = swap_rows.to(right.dtype)
            out["itm_swap_acc"] = (right[2 * bs:] * rows).sum() / rows.sum().clamp_min(1.0)
    return out
