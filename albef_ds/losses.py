"""ALBEF's losses and samplers as pure functions of tensors.

Nothing here knows about ranks, DeepSpeed or modules: callers hand in the features (local
or gathered), and the functions return losses. Formulas: ALBEF_FACTS.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: label of positions that carry no MLM loss (as in Hugging Face / PyTorch CE).
IGNORE_INDEX = -100


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a narrower float (bf16, fp16); float64 stays float64. Every
    upcast in the losses and attention goes through here, so a float64 model is float64 end
    to end (its checks mean something) while bf16 softmaxes still run in fp32."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def at_least_fp32_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`at_least_fp32` gives a float tensor of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------- ITC + MoD

def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(log_softmax(logits) * targets).sum(1).mean()"""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def distilled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                            logits_m: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """Classification with momentum distillation (the reference's VE and NLVR2 heads):
    ``(1 - alpha) CE(logits, labels) + alpha soft_CE(logits, softmax(logits_m))``; plain
    CE without momentum logits. Computed in at least fp32."""
    logits = at_least_fp32(logits)
    hard = F.cross_entropy(logits, labels)
    if logits_m is None:
        return hard
    return (1 - alpha) * hard + alpha * soft_cross_entropy(logits, F.softmax(at_least_fp32(logits_m), dim=1))


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor,
             image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
             image_cands_m: torch.Tensor, text_cands_m: torch.Tensor,
             pos_targets: torch.Tensor, temp: torch.Tensor, alpha: float):
    """Image-text contrastive loss with momentum distillation.

    image_feat, text_feat: [B, D] online features (normalised) of the local batch.
    image_feat_m, text_feat_m: [B, D] their momentum counterparts.
    image_cands_m, text_cands_m: [K, D] momentum candidates (in-batch features, then queue).
    pos_targets: [B, K] ground-truth distribution over candidates (rows sum to 1).
    Returns (loss, sim_i2t [B, K], sim_t2i [B, K]).

    Similarities are computed in fp32 at least: bf16 keeps 8 bits of mantissa, so cosines
    near 1 divided by temp = 0.07 differ by ~0.1 between neighbouring values, noise in a
    softmax over 65k candidates.
    """
    image_feat, text_feat, image_feat_m, text_feat_m, image_cands_m, text_cands_m, temp = (
        at_least_fp32(t) for t in (image_feat, text_feat, image_feat_m, text_feat_m,
                                   image_cands_m, text_cands_m, temp))
    sim_i2t = image_feat @ text_cands_m.t() / temp
    sim_t2i = text_feat @ image_cands_m.t() / temp
    with torch.no_grad():
        targets_i2t = pos_targets.to(sim_i2t.dtype)
        targets_t2i = pos_targets.to(sim_i2t.dtype)
        if alpha > 0:
            sim_i2t_m = image_feat_m @ text_cands_m.t() / temp
            sim_t2i_m = text_feat_m @ image_cands_m.t() / temp
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets_i2t
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets_t2i
    loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return loss, sim_i2t, sim_t2i


def diagonal_targets(batch: int, num_cands: int, offset: int, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, K] one-hot at column ``offset + i`` for row i (positives in the candidate list).
    ``dtype``: that of the similarities they are used with."""
    targets = torch.zeros(batch, num_cands, device=device, dtype=dtype)
    targets[torch.arange(batch, device=device), offset + torch.arange(batch, device=device)] = 1.0
    return targets


def id_targets(row_ids: torch.Tensor, cand_ids: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, K] uniform over every candidate sharing the row's image id (retrieval fine-tuning).
    ``dtype``: that of the similarities they are used with (1/n made in fp32 and widened
    afterwards would not be 1/n in float64)."""
    same = (row_ids[:, None] == cand_ids[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, feats: torch.Tensor) -> None:
    """Write ``feats`` [N, D] into ``queue`` [D, Q] at ``ptr`` (in place) and advance the
    pointer modulo Q. Q must be a multiple of N so that a write never straddles the end.
    Q = 0 is no queue at all (the "no queue" ablation): nothing is written."""
    n, q = feats.shape[0], queue.shape[1]
    if q == 0:
        return
    if q % n != 0:
        raise ValueError(f"queue size {q} is not a multiple of the enqueued batch {n}")
    # Columns computed on the device from the pointer: no host sync (int(ptr)) per step.
    columns = (ptr + torch.arange(n, device=ptr.device)) % q
    queue.index_copy_(1, columns.to(queue.device), feats.t().to(queue.dtype))
    ptr.copy_((ptr + n) % q)


# ----------------------------------------------------------------------------- ITM

def itm_weights(sim: torch.Tensor, pos_idx: torch.Tensor,
                row_ids: Optional[torch.Tensor] = None,
                cand_ids: Optional[torch.Tensor] = None,
                uniform_mix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling weights over in-batch candidates for hard negatives.

    sim: [B, C] similarities (already divided by temp); pos_idx: [B] column of each row's
    positive. Excludes the positive and, with image ids, every candidate of the same image
    (-inf before the softmax). Computed in fp32 (bf16 softmax can underflow to an all-zero
    row, which torch.multinomial rejects) or wider. Rows with no valid candidate fall back to uniform
    over all non-positive columns; the second return value flags them.

    ``uniform_mix`` = p: each draw is, with probability p, uniform over the valid
    candidates instead ("easy" negatives): the mixture (1 - p) * hard + p * uniform.
    """
    logits = at_least_fp32(sim.detach()).clone()
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[torch.arange(len(pos_idx), device=sim.device), pos_idx] = True
    if row_ids is not None and cand_ids is not None:
        excluded |= row_ids[:, None] == cand_ids[None, :]
    logits.masked_fill_(excluded, float("-inf"))
    empty = excluded.all(dim=1)
    # Always built (no `if empty.any()`: that would be a host sync per step on a GPU).
    fallback = torch.zeros_like(logits)
    fallback[torch.arange(len(pos_idx), device=sim.device), pos_idx] = float("-inf")
    logits = torch.where(empty[:, None], fallback, logits)
    weights = F.softmax(logits, dim=1)
    # exp underflow can still zero a whole row with huge similarity gaps; guard it too.
    weights = torch.nan_to_num(weights, nan=0.0)
    if uniform_mix > 0.0:
        valid = torch.isfinite(logits).to(weights.dtype)
        weights = (1.0 - uniform_mix) * weights + uniform_mix * valid / valid.sum(dim=1, keepdim=True)
    return weights, empty


def sample_negatives(weights: torch.Tensor, generator: Optional[torch.Generator] = None,
                     vectorized: bool = True) -> torch.Tensor:
    """One candidate per row drawn from ``weights`` [B, C].

    vectorized: one torch.multinomial over the batch (no host sync per sample); otherwise
    the reference's Python loop of per-row draws (kept as the benchmark baseline). Both
    consume the generator identically, row by row, so they draw the same indices.
    """
    if vectorized:
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.stack([torch.multinomial(w, 1, generator=generator)[0] for w in weights])


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(at_least_fp32(logits), labels)


# ----------------------------------------------------------------------------- MLM

def mask_tokens(input_ids: torch.Tensor, vocab_size: int, mask_token_id: int,
                pad_token_id: int, cls_token_id: int, probability: float = 0.15,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking as ALBEF does it: select ``probability`` of the tokens (never CLS or PAD;
    SEP can be selected), replace 80% of them by [MASK], 10% by a random token, keep 10%.
    Returns (masked_ids, labels) with labels -100 at unselected positions."""
    device = input_ids.device
    selected = torch.rand(input_ids.shape, generator=generator, device=device) < probability
    selected &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = selected & (draw < 0.8)
    to_random = selected & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor,
             logits_m: Optional[torch.Tensor] = None, alpha: float = 0.0,
             normalizer: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * soft CE against softmax(logits_m), averaged over masked
    tokens. ``logits`` is [..., V] with ``labels`` [...] (positions with -100 ignored), or
    already restricted to the masked positions. ``normalizer`` replaces the local count of
    masked tokens (e.g. the global count divided by the world size, for exact data-parallel
    equivalence)."""
    vocab = logits.shape[-1]
    logits = at_least_fp32(logits.reshape(-1, vocab))
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    count = normalizer if normalizer is not None else keep.sum().clamp(min=1)
    log_probs = F.log_softmax(logits, dim=-1)
    ce = -log_probs.gather(1, labels[:, None]).squeeze(1)
    loss = ce.sum() / count
    if logits_m is not None and alpha > 0:
        soft = F.softmax(at_least_fp32(logits_m.reshape(-1, vocab)[keep]), dim=-1)
        distill = -(log_probs * soft).sum(dim=-1)
        loss = (1 - alpha) * loss + alpha * distill.sum() / count
    return loss
