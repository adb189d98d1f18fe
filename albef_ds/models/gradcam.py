"""Grad-CAM on a fusion layer's cross-attention, for weakly-supervised grounding.

ALBEF (Grounding.py, ``--gradcam_mode itm``) keeps the cross-attention probabilities of
one fusion layer (``--block_num 8``: ``encoder.layer[8]``, the 3rd fusion layer of
albef-base) and their gradient with respect to the ITM score (the positive logit
``itm_head(fused[:, 0])[:, 1]``, summed over the batch), then per text:
``cam = attention * clamp(gradient, min=0)`` over the image patches (the image [CLS]
dropped), zeroed at padded text positions, averaged over heads, then over the text
positions, reshaped to the patch grid. The reference's mean over text positions counts its
batch's padding too (``padding='longest'``): ours averages over each text's own tokens, so a
map does not depend on how far its batch was padded (boxes rank the same: a per-text scale).

Usage::

    with saved_cross_attention(model.text_encoder.bert, layer=GRADCAM_LAYER) as attn:
        score = model.itm_logits(model.fuse(...))[:, 1].sum()
        score.backward()
    maps = gradcam(attn.attention_map.detach(), attn.attention_map.grad, text_mask, grid)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .bert import BertModel, BertSelfAttention

#: the reference's default ``block_num`` (Grounding.py): ``encoder.layer[8]``, the 3rd of
#: albef-base's fusion layers (fusion_layer 6).
GRADCAM_LAYER = 8


@contextlib.contextmanager
def saved_cross_attention(bert: BertModel, layer: int = GRADCAM_LAYER) -> Iterator[BertSelfAttention]:
    """Within the block, ``bert.encoder.layer[layer]``'s cross-attention keeps its
    probabilities [B, heads, Lt, Li] as ``attention_map`` (gradient retained: read
    ``attention_map.grad`` after backward) and runs the explicit softmax path. Yields
    that attention module; what it kept stays readable after the block."""
    block = bert.encoder.layer[layer]
    if not block.has_cross_attention:
        raise ValueError(f"encoder.layer[{layer}] has no cross-attention (fusion layers start "
                         f"at {bert.cfg.fusion_layer})")
    attn = block.crossattention.self
    attn.attention_map = None
    attn.save_attention = True
    try:
        yield attn
    finally:
        attn.save_attention = False


def gradcam(attn: torch.Tensor, grads: torch.Tensor, text_mask: torch.Tensor,
            grid: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM maps [B, H', W'] from one cross-attention's probabilities ``attn`` and the
    score's gradient ``grads`` with respect to them, both [B, heads, Lt, 1 + H'*W'] (image
    [CLS] first, then the patches row by row); ``text_mask`` [B, Lt] 1/0.

    The mean over text runs over each text's own tokens (``text_mask``), not its padding: the
    map is the same however long the batch is padded (the reference divides by the padded
    length, a per-text scale that does not change how boxes of one text rank)."""
    b, _, lt, li = attn.shape
    h, w = grid
    if li != 1 + h * w:
        raise ValueError(f"{li} image tokens do not make [CLS] + a {h}x{w} grid")
    keep = text_mask[:, None, :, None].to(attn.dtype)
    cam = attn[..., 1:] * grads[..., 1:].clamp(min=0) * keep
    tokens = keep.sum(dim=2).clamp_min(1)  # [B, 1, 1]: real text tokens per text
    return (cam.mean(dim=1).sum(dim=1) / tokens[:, 0]).reshape(b, h, w)
