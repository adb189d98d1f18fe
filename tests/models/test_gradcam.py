"""Grad-CAM support (albef_ds/models/gradcam.py, ``save_attention`` on a cross-attention)
against a hand computation on a tiny random model: the fusion pass and ITM logit written
out plainly from the weights, the kept layer's cross-attention probabilities taken there
and their gradient by torch.autograd.grad, the map by loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from albef_ds.models import ALBEF
from albef_ds.models.gradcam import gradcam, saved_cross_attention
from tests.support.hf import batch, model_cfg, randomise

GRID = (2, 2)  # image_res 32, patch 16: [CLS] + 2x2 patches


def tiny_model(sdpa):
    cfg = model_cfg(sdpa=sdpa)  # 4 layers, fusion layers 2 and 3
    torch.manual_seed(0)
    model = ALBEF(cfg).eval()
    randomise(model.text_encoder, seed=21)
    randomise(model.itm_head, seed=22)
    return cfg, model


def inputs(cfg, seed=23):
    ids, mask = batch(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(*ids.shape, cfg.text_width, generator=g)
    image = torch.randn(ids.shape[0], 1 + GRID[0] * GRID[1], cfg.vision_width, generator=g)
    return text, mask, image


def plain_attention(p, prefix, hidden, source, mask, heads):
    """softmax(QK^T / sqrt(d) + mask) V from the weights ``p[prefix + ...]``; returns (out, probs)."""
    def lin(x, name):
        return x @ p[f"{prefix}.{name}.weight"].T + p[f"{prefix}.{name}.bias"]

    b, lq, width = hidden.shape
    d = width // heads
    q = lin(hidden, "self.query").view(b, lq, heads, d).transpose(1, 2)
    k = lin(source, "self.key").view(b, source.shape[1], heads, d).transpose(1, 2)
    v = lin(source, "self.value").view(b, source.shape[1], heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    probs = e / e.sum(-1, keepdim=True)
    out = (probs @ v).transpose(1, 2).reshape(b, lq, width)
    out = F.layer_norm(lin(out, "output.dense") + hidden, (width,),
                       p[f"{prefix}.output.LayerNorm.weight"], p[f"{prefix}.output.LayerNorm.bias"], 1e-12)
    return out, probs


def plain_itm_score(model, text, mask, image, keep_layer):
    """The summed positive ITM logit and the probabilities of ``keep_layer``'s cross-attention."""
    cfg = model.cfg
    p = dict(model.named_parameters())
    pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    hidden, kept = text, None
    for i in range(cfg.fusion_layer, cfg.text_depth):
        pre = f"text_encoder.bert.encoder.layer.{i}"
        hidden, _ = plain_attention(p, f"{pre}.attention", hidden, hidden, pad, cfg.text_heads)
        hidden, probs = plain_attention(p, f"{pre}.crossattention", hidden, image, None, cfg.text_heads)
        if i == keep_layer:
            kept = probs
        mid = F.gelu(hidden @ p[f"{pre}.intermediate.dense.weight"].T + p[f"{pre}.intermediate.dense.bias"])
        hidden = F.layer_norm(mid @ p[f"{pre}.output.dense.weight"].T + p[f"{pre}.output.dense.bias"] + hidden,
                              (cfg.text_width,), p[f"{pre}.output.LayerNorm.weight"],
                              p[f"{pre}.output.LayerNorm.bias"], 1e-12)
    logits = hidden[:, 0] @ p["itm_head.weight"].T + p["itm_head.bias"]
    return logits[:, 1].sum(), kept


def hand_gradcam(attn, grads, mask, grid):
    b, heads, lt, _ = attn.shape
    out = torch.zeros(b, grid[0] * grid[1], dtype=attn.dtype)
    for i in range(b):
        for patch in range(grid[0] * grid[1]):
            total = 0.0
            for h in range(heads):
                for t in range(lt):
                    if mask[i, t]:
                        total += attn[i, h, t, 1 + patch] * max(grads[i, h, t, 1 + patch].item(), 0.0)
            out[i, patch] = total / (heads * int(mask[i].sum()))  # the text's own tokens
    return out.view(b, *grid)


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("layer", [2, 3])
def test_kept_attention_gradient_and_map_equal_a_hand_computation(sdpa, layer):
    cfg, model = tiny_model(sdpa)
    text, mask, image = inputs(cfg)
    bert = model.text_encoder.bert
    with torch.no_grad():
        untouched = model.itm_logits(model.fuse(text, mask, image))
    with saved_cross_attention(bert, layer) as attn:
        logits = model.itm_logits(model.fuse(text, mask, image))
        model.zero_grad()
        logits[:, 1].sum().backward()
    assert not attn.save_attention  # off again after the block
    kept, grads = attn.attention_map.detach(), attn.attention_map.grad
    assert kept.shape == (3, cfg.text_heads, mask.shape[1], image.shape[1])
    torch.testing.assert_close(logits, untouched, rtol=1e-5, atol=1e-5)  # saving changes nothing

    score, probs = plain_itm_score(model, text, mask, image, layer)
    (want_grads,) = torch.autograd.grad(score, probs)
    torch.testing.assert_close(score, logits[:, 1].sum(), rtol=0, atol=1e-5)
    torch.testing.assert_close(kept, probs.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grads, want_grads, rtol=0, atol=1e-6)
    assert (want_grads > 0).any() and (want_grads < 0).any()  # the clamp has work to do

    maps = gradcam(kept, grads, mask, GRID)
    assert maps.shape == (3, *GRID)
    torch.testing.assert_close(maps, hand_gradcam(probs.detach(), want_grads, mask, GRID), rtol=0, atol=1e-6)
    # Padded text positions contribute nothing.
    noisy = grads.clone()
    noisy[~mask.bool()[:, None, :, None].expand_as(noisy)] = 1e3
    torch.testing.assert_close(gradcam(kept, noisy, mask, GRID), maps, rtol=0, atol=0)


def test_saved_cross_attention_needs_a_fusion_layer_and_a_grid_that_fits():
    cfg, model = tiny_model(True)
    with pytest.raises(ValueError, match="no cross-attention"):
        with saved_cross_attention(model.text_encoder.bert, 1):
            pass
    attn = torch.rand(1, 2, 3, 5)
    with pytest.raises(ValueError, match="grid"):
        gradcam(attn, attn, torch.ones(1, 3), (3, 3))
