"""The VQA answer decoder: a causal BERT that reads the question-image fusion output.

ALBEF generates answers (ALBEF models/model_vqa.py): ``text_decoder`` is a BERT language
model of 6 layers, every one with causal self-attention, cross-attention to the fusion
encoder's output over the question (padded, so masked) and an MLP, then the LM head tied
to its own word embeddings. It is initialised from the pretrained model: embeddings and
LM head from the text encoder's, layer ``i`` from fusion layer ``fusion_layer + i``
(ALBEF VQA.py). Module and parameter names are those of the reference's
``BertLMHeadModel`` (``bert.embeddings.*``, ``bert.encoder.layer.{i}.attention|
crossattention|intermediate|output.*``, ``cls.predictions.*``), so its checkpoints load
by name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..losses import at_least_fp32
from .bert import BertEmbeddings, BertForMaskedLM, BertLayer, BertOnlyMLMHead, additive_mask, init_bert_weights

#: the reference's decoder depth (config_decoder.num_hidden_layers = 6 in model_vqa.py):
#: as many layers as albef-base has fusion layers, each initialised from one of them.
ANSWER_DECODER_LAYERS = 6


class BertDecoderLayers(nn.Module):
    def __init__(self, cfg: ModelConfig, num_layers: int, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, cross=True, causal=True, cross_width=encoder_width)
                                    for _ in range(num_layers)])


class BertDecoderModel(nn.Module):
    """Embeddings + causal layers with cross-attention (the reference decoder's ``bert``)."""

    def __init__(self, cfg: ModelConfig, num_layers: int, encoder_width: int):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertDecoderLayers(cfg, num_layers, encoder_width)
        self.gradient_checkpointing = cfg.activation_checkpointing

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, encoder_states: torch.Tensor,
                encoder_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        ext = additive_mask(mask, hidden.dtype)  # the layers add the causal part
        cross_ext = additive_mask(encoder_mask, hidden.dtype)
        for layer in self.encoder.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, ext, encoder_states, None, cross_ext, use_reentrant=False)
            else:
                hidden = layer(hidden, ext, encoder_states, None, cross_ext)
        return hidden


class BertLMHeadDecoder(nn.Module):
    """``bert`` (causal decoder) and ``cls`` (LM head tied to ``bert``'s word embeddings).

    ``encoder_width``: width of the states it attends to (default ``text_width``: the
    fusion encoder's output)."""

    def __init__(self, cfg: ModelConfig, num_layers: int = ANSWER_DECODER_LAYERS,
                 encoder_width: Optional[int] = None):
        super().__init__()
        self.bert = BertDecoderModel(cfg, num_layers, encoder_width or cfg.text_width)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.apply(init_bert_weights)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, encoder_states: torch.Tensor,
                encoder_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [B, L, V]; position t predicts token t + 1.

        ``input_ids``/``mask``: [B, L] answer tokens (first the start token) and their
        1/0 padding mask; ``encoder_states`` [B, Ls, encoder_width] with its 1/0 mask [B, Ls]."""
        return self.cls.predictions(self.bert(input_ids, mask, encoder_states, encoder_mask))

    @torch.no_grad()
    def init_from_encoder(self, encoder: BertForMaskedLM) -> None:
        """Embeddings and LM head from ``encoder``'s; decoder layer i from its fusion layer i
        (self-attention, cross-attention, MLP), as the reference initialises the VQA decoder.
        Needs ``encoder_width`` equal to the fusion layers' cross-attention width."""
        fusion = list(encoder.bert.fusion_layers)
        if len(fusion) < len(self.bert.encoder.layer):
            raise ValueError(f"{len(self.bert.encoder.layer)} decoder layers but only "
                             f"{len(fusion)} fusion layers to initialise them from")
        self.bert.embeddings.load_state_dict(encoder.bert.embeddings.state_dict())
        for mine, theirs in zip(self.bert.encoder.layer, fusion):
            mine.load_state_dict(theirs.state_dict())
        self.cls.load_state_dict(encoder.cls.state_dict())


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
               soft_targets: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """Per-sequence negative log-likelihood [B] of the answer tokens after the first.

    ``logits`` [B, L, V] from :meth:`BertLMHeadDecoder.forward`; ``labels`` [B, L], the
    answer ids with -100 at the padding. Position t's logits score token t + 1 and the
    cross-entropies are summed over the sequence, as the reference's ``BertLMHeadModel``
    with ``reduction='none'`` (ALBEF models/xbert.py). ALBEF uses no label smoothing (its
    successor BLIP uses 0.1): ``label_smoothing`` defaults to 0.

    ``soft_targets`` [B, L - 1, V] (the momentum decoder's softmax over the shifted logits)
    mixes in distillation as the reference does: ``(1 - alpha) * nll + alpha * sum over the
    labelled tokens of -sum(soft_targets * log_softmax(logits))``. The answer's
    log-likelihood is ``-answer_nll(logits, labels)``."""
    shifted = at_least_fp32(logits[:, :-1])
    targets = labels[:, 1:]
    b, steps, vocab = shifted.shape
    nll = F.cross_entropy(shifted.reshape(-1, vocab), targets.reshape(-1), reduction="none",
                          ignore_index=-100, label_smoothing=label_smoothing).view(b, steps).sum(1)
    if soft_targets is None:
        return nll
    distill = -(shifted.log_softmax(-1) * soft_targets).sum(-1)
    distill = (distill * (targets != -100)).sum(1)
    return (1 - alpha) * nll + alpha * distill
