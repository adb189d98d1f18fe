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

Options for the downstream tasks (all off by default, none changes a parameter name):
- ``causal`` self-attention (the VQA answer decoder, albef_ds/models/decoder.py);
- ``images_per_text=2``: the NLVR2 fusion encoder, each pretrained fusion layer replicated
  into consecutive blocks that attend to image 0, image 1, ... (see :class:`BertEncoder`);
- ``save_attention`` on a cross-attention: keeps its probabilities and their gradient for
  Grad-CAM (albef_ds/models/gradcam.py).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..losses import at_least_fp32


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] of 1 (keep) / 0 (pad) -> [B, 1, 1, L] additive mask, as BERT builds it."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def with_causal(mask: Optional[torch.Tensor], length: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Additive [B or 1, 1, L, L] mask: query i sees keys j <= i, minus the padded keys of
    ``mask`` (additive [B, 1, 1, L] or None)."""
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    lowest = torch.finfo(dtype).min
    causal = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(future, lowest)
    if mask is None:
        return causal[None, None]
    # Clamped: a padded future key would otherwise sum two finfo.min into -inf.
    return (mask.to(dtype) + causal).clamp_min(lowest)


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
    def __init__(self, cfg: ModelConfig, kv_width: int, causal: bool = False):
        super().__init__()
        #: each query sees only itself and earlier keys (the answer decoder's self-attention).
        self.causal = causal
        #: keep the attention probabilities (``attention_map``, before dropout) with their
        #: gradient retained (``attention_map.grad`` after backward): Grad-CAM. Forces the
        #: explicit softmax path, since SDPA never materialises the probabilities.
        self.save_attention = False
        self.attention_map: Optional[torch.Tensor] = None
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
        """``mask`` is additive [B, 1, 1, Lk] (or [B, 1, Lq, Lk]) or None; keys/values from
        ``source`` (default: ``hidden``) unless precomputed ``kv`` are given."""
        q = self.split_heads(self.query(hidden))
        k, v = kv if kv is not None else self.kv(hidden if source is None else source)
        if self.causal:
            mask = with_causal(mask, q.shape[-2], mask.dtype if mask is not None else q.dtype, q.device)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.sdpa and sdpa_pays_off(q, dropout_p) and not self.save_attention:
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
            if self.save_attention:
                self.attention_map = probs
                if probs.requires_grad:
                    probs.retain_grad()
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
    def __init__(self, cfg: ModelConfig, kv_width: int, causal: bool = False):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width, causal)
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
    """Self-attention (``causal`` for a decoder), optional cross-attention to a source of
    width ``cross_width`` (default: the image tokens, ``vision_width``), MLP."""

    def __init__(self, cfg: ModelConfig, cross: bool, causal: bool = False,
                 cross_width: Optional[int] = None):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.text_width, causal)
        self.has_cross_attention = cross
        if cross:
            self.crossattention = BertAttention(cfg, cross_width or cfg.vision_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg.text_intermediate, cfg)

    def forward(self, hidden, mask, image_embeds=None, image_kv=None, cross_mask=None):
        """``cross_mask``: additive [B, 1, 1, Ls] over the cross-attention source. None for
        image tokens, which are all valid; the answer decoder's source (question tokens)
        is padded and needs it."""
        hidden = self.attention(hidden, mask)
        if self.has_cross_attention:
            hidden = self.crossattention(hidden, cross_mask, image_embeds, image_kv)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    """Text layers ``[0, fusion_layer)``, then the fusion layers.

    ``images_per_text=n`` (NLVR2: 2) replicates each of the ``text_depth - fusion_layer``
    fusion layers into ``n`` consecutive blocks, block ``j`` of a group attending to image
    ``j``: the reference NLVR2 model (ALBEF models/model_nlvr.py, 18 layers for n = 2). The
    blocks of a group share their cross-attention key and value projections (the
    reference's ``share_cross_attention``; the paper: "the two cross-attention layers share
    the same linear projection weights for keys and values"). Shared modules appear under
    every block's name in the state dict, as the reference's shared parameters do, so its
    checkpoints load strictly. :func:`replicate_fusion_layers` builds such a state dict
    from a single-image one.
    """

    def __init__(self, cfg: ModelConfig, images_per_text: int = 1):
        super().__init__()
        if images_per_text < 1:
            raise ValueError(f"images_per_text must be >= 1, got {images_per_text}")
        depth = cfg.fusion_layer + images_per_text * (cfg.text_depth - cfg.fusion_layer)
        self.layer = nn.ModuleList(
            [BertLayer(cfg, cross=i >= cfg.fusion_layer) for i in range(depth)])
        fusion = self.layer[cfg.fusion_layer:]
        for first in range(0, len(fusion), images_per_text):
            shared = fusion[first].crossattention.self
            for block in fusion[first + 1: first + images_per_text]:
                block.crossattention.self.key = shared.key
                block.crossattention.self.value = shared.value


_LAYER_KEY = re.compile(r"^(?P<head>(?:.*\.)?encoder\.layer\.)(?P<num>\d+)(?P<tail>\..*)$")


def replicate_fusion_layers(state_dict: dict, fusion_layer: int, images_per_text: int = 2) -> dict:
    """A single-image state dict -> one for ``images_per_text`` images: every key
    ``….encoder.layer.{k}.…`` with ``k >= fusion_layer`` becomes ``images_per_text`` keys,
    layers ``fusion_layer + n*(k - fusion_layer) + j``, all holding the pretrained tensor (the
    reference's NLVR2 initialisation, ALBEF Pretrain_nlvr.py). Other keys are kept as they
    are; no tensor is copied."""
    out = {}
    for key, value in state_dict.items():
        m = _LAYER_KEY.match(key)
        if m is None or int(m["num"]) < fusion_layer:
            out[key] = value
            continue
        base = fusion_layer + images_per_text * (int(m["num"]) - fusion_layer)
        for j in range(images_per_text):
            out[f"{m['head']}{base + j}{m['tail']}"] = value
    return out


ImageInput = Union[torch.Tensor, Sequence[torch.Tensor]]


class BertModel(nn.Module):
    """Embeddings + layers; ``encode_text`` and ``fuse`` run the two halves."""

    def __init__(self, cfg: ModelConfig, images_per_text: int = 1):
        super().__init__()
        self.cfg = cfg
        #: images each text attends to in the fusion layers (NLVR2: 2, see BertEncoder).
        self.images_per_text = images_per_text
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, images_per_text)
        self.gradient_checkpointing = cfg.activation_checkpointing

    def _images(self, image_embeds: Optional[ImageInput]) -> Optional[Sequence[torch.Tensor]]:
        """One tensor (one image per text) or a sequence of ``images_per_text`` tensors."""
        if image_embeds is None:
            return None
        images = (image_embeds,) if isinstance(image_embeds, torch.Tensor) else tuple(image_embeds)
        if len(images) != self.images_per_text:
            raise ValueError(f"this fusion encoder takes {self.images_per_text} image(s) per text, "
                             f"got {len(images)}")
        return images

    def _run(self, layers: Sequence[BertLayer], hidden, mask, image_embeds=None, image_kvs=None):
        ext = additive_mask(mask, hidden.dtype)
        images = self._images(image_embeds)
        for i, layer in enumerate(layers):
            kv = image_kvs[i] if image_kvs is not None else None
            # Fusion block i attends to image i mod n (the reference's layer_num rule).
            image = images[i % len(images)] if images is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, ext, image, kv, use_reentrant=False)
            else:
                hidden = layer(hidden, ext, image, kv)
        return hidden

    @property
    def text_layers(self) -> Sequence[BertLayer]:
        return self.encoder.layer[: self.cfg.fusion_layer]

    @property
    def fusion_layers(self) -> Sequence[BertLayer]:
        return self.encoder.layer[self.cfg.fusion_layer:]

    def encode_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.text_layers, self.embeddings(input_ids), mask)

    def cross_kv(self, image_embeds: ImageInput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of these images for every fusion layer (each fusion
        block's own image when there are several per text)."""
        images = self._images(image_embeds)
        return [layer.crossattention.self.kv(images[i % len(images)])
                for i, layer in enumerate(self.fusion_layers)]

    def fuse(self, text_embeds: torch.Tensor, mask: torch.Tensor,
             image_embeds: Optional[ImageInput] = None,
             image_kvs: Optional[list] = None) -> torch.Tensor:
        """Fusion layers over text hidden states, attending to ``image_embeds`` (or to
        precomputed per-layer keys/values from :meth:`cross_kv`, already indexed per row).
        With ``images_per_text > 1``, ``image_embeds`` is a sequence of that many tensors."""
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


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, zero bias, unit LayerNorm); ``module.apply`` it."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


class BertForMaskedLM(nn.Module):
    """``bert`` (embeddings + encoder, no pooler) and ``cls`` (the tied MLM head)."""

    def __init__(self, cfg: ModelConfig, images_per_text: int = 1):
        super().__init__()
        self.bert = BertModel(cfg, images_per_text)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_bert_weights)

    def mlm_logits(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   masked_only: bool = True, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vocabulary logits: [M, V] at the M positions where labels != -100 when
        ``masked_only``, else [B, L, V] everywhere; [P, V] at the flat (row-major) token
        indices ``positions`` when given (a static count P: see objectives/mlm.py)."""
        if positions is not None:
            return self.cls.predictions(hidden.reshape(-1, hidden.shape[-1])[positions])
        if masked_only:
            if labels is None:
                raise ValueError("masked_only MLM logits need the labels")
            hidden = hidden[labels != -100]
        return self.cls.predictions(hidden)
