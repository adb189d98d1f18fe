"""BERT text + fusion encoder, written for ALBEF.

Layers ``[0, fusion_layer)`` are the text encoder (self-attention only); layers
``[fusion_layer, depth)`` are the fusion encoder (self-attention, cross-attention to the
image tokens, MLP). Module and parameter names follow Hugging Face's ``BertForMaskedLM``
so that ``bert-base-uncased`` folders and the reference ALBEF checkpoints load by name.

Attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU); ``sdpa=False`` selects the explicit softmax(QK^T)V of the reference, used
as the baseline in benchmarks. Cross-attention keys/values of an image can be computed
once per fusion layer and reused by every fusion pass that sees that image
(:meth:`BertModel.cross_kv`), which the reference recomputes for each pass.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..losses import at_least_fp32


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] of 1 (keep) / 0 (pad) -> [B, 1, 1, L] additive mask, as BERT builds it."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def sdpa_pays_off(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether ``F.scaled_dot_product_attention`` beats the explicit softmax(QK^T)V here.
    Always on GPUs. On CPU (torch 2.14, measured in docs/benchmarks.md): with dropout there
    is no fused kernel and the math fallback's masked-row-safe softmax costs more than the
    explicit form; in bf16 the CPU flash kernel is 6-13x slower than the explicit form
    (its backward above all). The two forms compute the same attention."""
    return q.device.type != "cpu" or (dropout_p == 0.0 and q.dtype == torch.float32)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.text_width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        # A buffer in the reference state dict, so it is kept (persistent) here too.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None, :])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        embeds = (self.word_embeddings(input_ids)
                  + self.position_embeddings(self.position_ids[:, :length])
                  # ALBEF never uses segment ids: every token is type 0. The module is called
                  # (not its weight read) so that ZeRO-3 gathers the partitioned weight.
                  + self.token_type_embeddings(torch.zeros_like(self.position_ids[:, :length])))
        return self.dropout(self.LayerNorm(embeds))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.text_heads
        self.head_dim = cfg.text_width // cfg.text_heads
        self.query = nn.Linear(cfg.text_width, cfg.text_width)
        self.key = nn.Linear(kv_width, cfg.text_width)
        self.value = nn.Linear(kv_width, cfg.text_width)
        self.dropout_p = cfg.attention_dropout
        self.sdpa = cfg.sdpa

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.key(source)), self.split_heads(self.value(source))

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
                source: Optional[torch.Tensor] = None,
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """``mask`` is additive [B, 1, 1, Lk] or None; keys/values from ``source`` (default:
        ``hidden``) unless precomputed ``kv`` are given."""
        q = self.split_heads(self.query(hidden))
        k, v = kv if kv is not None else self.kv(hidden if source is None else source)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.sdpa and sdpa_pays_off(q, dropout_p):
            if mask is not None:
                mask = mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask.to(scores.dtype)
            # softmax in fp32 (a no-op in fp32): under bf16 autocast on CPU a bf16 softmax
            # over rows shorter than 32 keys is 3-4x slower, forward + backward, and less exact.
            probs = at_least_fp32(scores).softmax(dim=-1).to(v.dtype)  # bf16/fp16 softmax in fp32, fp64 stays fp64
            probs = F.dropout(probs, p=dropout_p, training=self.training)
            out = probs @ v
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual LayerNorm (also the MLP's output block)."""

    def __init__(self, in_width: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg.text_width, cfg)

    def forward(self, hidden, mask=None, source=None, kv=None):
        return self.output(self.self(hidden, mask, source, kv), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.text_width)
        self.has_cross_attention = cross
        if cross:
            self.crossattention = BertAttention(cfg, cfg.vision_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg.text_intermediate, cfg)

    def forward(self, hidden, mask, image_embeds=None, image_kv=None):
        hidden = self.attention(hidden, mask)
        if self.has_cross_attention:
            # Every image token is valid: cross-attention needs no mask.
            hidden = self.crossattention(hidden, None, image_embeds, image_kv)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            [BertLayer(cfg, cross=i >= cfg.fusion_layer) for i in range(cfg.text_depth)])


class BertModel(nn.Module):
    """Embeddings + layers; ``encode_text`` and ``fuse`` run the two halves."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.gradient_checkpointing = cfg.activation_checkpointing

    def _run(self, layers: Sequence[BertLayer], hidden, mask, image_embeds=None, image_kvs=None):
        ext = additive_mask(mask, hidden.dtype)
        for i, layer in enumerate(layers):
            kv = image_kvs[i] if image_kvs is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, ext, image_embeds, kv, use_reentrant=False)
            else:
                hidden = layer(hidden, ext, image_embeds, kv)
        return hidden

    @property
    def text_layers(self) -> Sequence[BertLayer]:
        return self.encoder.layer[: self.cfg.fusion_layer]

    @property
    def fusion_layers(self) -> Sequence[BertLayer]:
        return self.encoder.layer[self.cfg.fusion_layer:]

    def encode_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.text_layers, self.embeddings(input_ids), mask)

    def cross_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of these images for every fusion layer."""
        return [layer.crossattention.self.kv(image_embeds) for layer in self.fusion_layers]

    def fuse(self, text_embeds: torch.Tensor, mask: torch.Tensor,
             image_embeds: Optional[torch.Tensor] = None,
             image_kvs: Optional[list] = None) -> torch.Tensor:
        """Fusion layers over text hidden states, attending to ``image_embeds`` (or to
        precomputed per-layer keys/values from :meth:`cross_kv`, already indexed per row)."""
        if image_embeds is None and image_kvs is None:
            raise ValueError("fuse needs image_embeds or image_kvs")
        return self._run(self.fusion_layers, text_embeds, mask, image_embeds, image_kvs)


class BertPredictionTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.text_width, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        self.bias = self.decoder.bias  # HF names it twice: predictions.bias == decoder.bias

    def forward(self, hidden):
        return self.decoder(self.transform(hidden))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)


class BertForMaskedLM(nn.Module):
    """``bert`` (embeddings + encoder, no pooler) and ``cls`` (the tied MLM head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation (normal 0.02, zero bias, unit LayerNorm).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def mlm_logits(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   masked_only: bool = True) -> torch.Tensor:
        """Vocabulary logits: [M, V] at the M positions where labels != -100 when
        ``masked_only``, else [B, L, V] everywhere."""
        if masked_only:
            if labels is None:
                raise ValueError("masked_only MLM logits need the labels")
            hidden = hidden[labels != -100]
        return self.cls.predictions(hidden)
