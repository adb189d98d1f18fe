"""ALBEF: image encoder, text/fusion encoder, projections, momentum copies and queues.

Plain PyTorch, components only: the objectives (albef_ds/objectives) compose them into
losses, and reach other ranks only through the ``gather`` object they are handed.

Attribute names (``visual_encoder``, ``text_encoder.bert``, ``text_encoder.cls``,
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, ``*_m``, ``image_queue``,
``text_queue``, ``queue_ptr``) are those of the reference release, so its checkpoints map
onto ours key for key (albef_ds/weights.py).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import vit as vit_lib
from .bert import BertForMaskedLM

#: (online attribute, momentum attribute) pairs moved by the EMA; ``temp`` is not one.
#: Task heads add theirs (:meth:`ALBEF.add_head`).
MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                  ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"))


class ALBEF(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Shape [1], not the reference's 0-d scalar: DeepSpeed cannot broadcast 0-d tensors
        # (it views them as bytes). weights.py converts to and from the release's scalar.
        self.temp = nn.Parameter(torch.full((1,), float(cfg.temp)))
        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if cfg.itc_id_positives:
            # Image ids of the queued features (-100: empty slot), as ALBEF's retrieval model.
            self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))

        self.visual_encoder = vit_lib.build_vit(
            cfg.image_res, cfg.patch_size, cfg.vision_width, cfg.vision_depth, cfg.vision_heads,
            cfg.vision_mlp_ratio, cfg.activation_checkpointing, cfg.vision_pos_init)
        self.text_encoder = BertForMaskedLM(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)

        #: (online, momentum) attribute pairs the EMA moves: the pretraining ones, plus task heads
        self.momentum_pairs = list(MOMENTUM_PAIRS)
        #: attribute names of the heads downstream tasks added (add_head)
        self.task_heads: list[str] = []
        for online, momentum in MOMENTUM_PAIRS:
            self._add_momentum_copy(online, momentum)

    def _add_momentum_copy(self, online: str, momentum: str) -> None:
        module = copy.deepcopy(getattr(self, online))
        module.requires_grad_(False)
        setattr(self, momentum, module)

    def add_head(self, name: str, module: nn.Module, momentum: bool = False) -> None:
        """A downstream task's module (a classifier, an answer decoder), optionally with a
        momentum copy ``<name>_m`` that the EMA moves with the rest. Added before the model
        goes to its engine, so its parameters train and checkpoint like the others'."""
        setattr(self, name, module)
        self.task_heads.append(name)
        if momentum:
            self._add_momentum_copy(name, name + "_m")
            self.momentum_pairs.append((name, name + "_m"))
            self.task_heads.append(name + "_m")

    #: optional ``name -> context manager`` that times forward phases (albef-ds bench).
    phase_timer = None

    def phase(self, name: str):
        return self.phase_timer(name) if self.phase_timer is not None else contextlib.nullcontext()

    def _apply(self, fn, recurse=True):
        # The queues are fp32 buffers whatever the module is cast to (DeepSpeed's bf16 mode
        # casts every floating tensor): bf16 features would make the queue lossy. A float64
        # model keeps a float64 queue.
        super()._apply(fn, recurse)
        for name in ("image_queue", "text_queue"):
            buf = self._buffers[name]
            if buf.is_floating_point() and buf.element_size() < 4:
                self._buffers[name] = buf.float()
        return self

    # ----------------------------------------------------------------- components

    def _part(self, name: str, momentum: bool) -> nn.Module:
        return getattr(self, name + "_m" if momentum else name)

    def encode_image(self, images: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """[B, 3, R, R] -> all image tokens [B, 1 + (R/p)^2, vision_width]."""
        return vit_lib.encode(self._part("visual_encoder", momentum), images)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """Text-encoder layers only: [B, L] -> [B, L, text_width]."""
        return self._part("text_encoder", momentum).bert.encode_text(ids, mask)

    def image_feat(self, image_embeds: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """L2-normalised projection of the CLS token: [B, embed_dim]."""
        return F.normalize(self._part("vision_proj", momentum)(image_embeds[:, 0]), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                  momentum: bool = False) -> torch.Tensor:
        """L2-normalised projection of [CLS] (``text_pool: cls``) or of the mean over the
        caption's tokens, padding excluded (``text_pool: mean``): [B, embed_dim]."""
        if self.cfg.text_pool == "mean":
            pooled = self._mean_tokens(text_embeds, text_mask)
        else:
            pooled = text_embeds[:, 0]
        return F.normalize(self._part("text_proj", momentum)(pooled), dim=-1)

    @staticmethod
    def _mean_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens ``mask`` keeps: [B, L, D] -> [B, D]."""
        keep = mask[..., None].to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)

    def cross_kv(self, image_embeds: torch.Tensor, momentum: bool = False) -> list:
        """Per-fusion-layer cross-attention keys/values of these images, computed once."""
        return self._part("text_encoder", momentum).bert.cross_kv(image_embeds)

    def fuse(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
             image_embeds: Optional[torch.Tensor] = None, image_kvs: Optional[list] = None,
             momentum: bool = False) -> torch.Tensor:
        """Fusion layers: text hidden states attend to the image tokens."""
        return self._part("text_encoder", momentum).bert.fuse(text_embeds, text_mask, image_embeds, image_kvs)

    def itm_logits(self, fused: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ITM logits [B, 2] from the fused [CLS] (``itm_pool: cls``, the paper) or the mean
        of the fused tokens, padding excluded (``itm_pool: mean``, which needs ``mask``)."""
        if self.cfg.itm_pool == "mean":
            if mask is None:
                raise ValueError("itm_pool 'mean' needs the text mask")
            return self.itm_head(self._mean_tokens(fused, mask))
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, masked_ids: torch.Tensor, mask: torch.Tensor,
                   image_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                   image_kvs: Optional[list] = None, momentum: bool = False,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text + fusion encoder over masked ids, then the MLM head: [M, V] at the masked
        positions when ``labels`` are given and ``mlm_masked_only`` is on, else [B, L, V];
        [P, V] at the flat token indices ``positions`` when given."""
        encoder = self._part("text_encoder", momentum)
        hidden = encoder.bert.fuse(encoder.bert.encode_text(masked_ids, mask), mask, image_embeds, image_kvs)
        masked_only = self.cfg.mlm_masked_only and labels is not None
        return encoder.mlm_logits(hidden, labels, masked_only=masked_only, positions=positions)

    # ----------------------------------------------------------------- momentum

    def momentum_named_params(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(momentum parameter name, online parameter, momentum parameter), tied once."""
        out = []
        for a, b in self.momentum_pairs:
            online = getattr(self, a).named_parameters(prefix=a)
            momentum = getattr(self, b).named_parameters(prefix=b)
            out += [(name_m, p, p_m) for (_, p), (name_m, p_m) in zip(online, momentum)]
        return out

    def momentum_params(self) -> tuple[list, list]:
        triples = self.momentum_named_params()
        return [p for _, p, _ in triples], [p_m for _, _, p_m in triples]

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        for p, p_m in zip(*self.momentum_params()):
            p_m.copy_(p)

    # ----------------------------------------------------------------- training step

    def forward(self, compute, *args, **kwargs):
        """``compute(self, *args, **kwargs)``: an objective's step (albef_ds.objectives) run
        as this module's forward, so that engines see one forward call per micro-step
        (ZeRO-3 gathers and releases partitioned weights around it)."""
        return compute(self, *args, **kwargs)
