"""ALBEF: image encoder, text/fusion encoder, projections, momentum copies and queues.

Plain PyTorch. Other ranks are reached only through the ``gather`` object handed to
:meth:`ALBEF.forward` (see :mod:`albef_ds.gather`); with the default it is one process.

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

from .. import losses
from ..config import ModelConfig
from ..gather import SINGLE_PROCESS
from . import vit as vit_lib
from .bert import BertForMaskedLM, BertSpec

#: (online attribute, momentum attribute) pairs moved by the EMA; ``temp`` is not one.
MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                  ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"))


def bert_spec(cfg: ModelConfig) -> BertSpec:
    return BertSpec(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_layers=cfg.text_depth,
        num_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        fusion_layer=cfg.fusion_layer, encoder_width=cfg.vision_width,
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps, sdpa=cfg.sdpa,
        activation_checkpointing=cfg.activation_checkpointing)


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
            cfg.vision_mlp_ratio, cfg.activation_checkpointing)
        self.text_encoder = BertForMaskedLM(bert_spec(cfg))
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)

        for online, momentum in MOMENTUM_PAIRS:
            module = copy.deepcopy(getattr(self, online))
            module.requires_grad_(False)
            setattr(self, momentum, module)

    #: optional ``name -> context manager`` that times forward phases (albef-ds bench).
    phase_timer = None

    def _phase(self, name: str):
        return self.phase_timer(name) if self.phase_timer is not None else contextlib.nullcontext()

    def _apply(self, fn, recurse=True):
        # The queues are fp32 buffers whatever the module is cast to (DeepSpeed's bf16 mode
        # casts every floating tensor): bf16 features would make the queue lossy.
        super()._apply(fn, recurse)
        for name in ("image_queue", "text_queue"):
            buf = self._buffers[name]
            if buf.is_floating_point() and buf.dtype != torch.float32:
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
            keep = text_mask[..., None].to(text_embeds.dtype)
            pooled = (text_embeds * keep).sum(1) / keep.sum(1).clamp_min(1)
        else:
            pooled = text_embeds[:, 0]
        return F.normalize(self._part("text_proj", momentum)(pooled), dim=-1)

    def cross_kv(self, image_embeds: torch.Tensor, momentum: bool = False) -> list:
        """Per-fusion-layer cross-attention keys/values of these images, computed once."""
        return self._part("text_encoder", momentum).bert.cross_kv(image_embeds)

    def fuse(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
             image_embeds: Optional[torch.Tensor] = None, image_kvs: Optional[list] = None,
             momentum: bool = False) -> torch.Tensor:
        """Fusion layers: text hidden states attend to the image tokens."""
        return self._part("text_encoder", momentum).bert.fuse(text_embeds, text_mask, image_embeds, image_kvs)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, masked_ids: torch.Tensor, mask: torch.Tensor,
                   image_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                   image_kvs: Optional[list] = None, momentum: bool = False) -> torch.Tensor:
        """Text + fusion encoder over masked ids, then the MLM head: [M, V] at the masked
        positions when ``labels`` are given and ``mlm_masked_only`` is on, else [B, L, V]."""
        encoder = self._part("text_encoder", momentum)
        hidden = encoder.bert.fuse(encoder.bert.encode_text(masked_ids, mask), mask, image_embeds, image_kvs)
        masked_only = self.cfg.mlm_masked_only and labels is not None
        return encoder.mlm_logits(hidden, labels, masked_only=masked_only)

    # ----------------------------------------------------------------- momentum

    def momentum_named_params(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(momentum parameter name, online parameter, momentum parameter), tied once."""
        out = []
        for a, b in MOMENTUM_PAIRS:
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

    @torch.no_grad()
    def momentum_update(self, m: Optional[float] = None) -> None:
        """p_m <- m * p_m + (1 - m) * p, once per optimizer step."""
        m = self.cfg.momentum if m is None else m
        online, momentum = self.momentum_params()
        if self.cfg.foreach_ema:
            torch._foreach_mul_(momentum, m)
            torch._foreach_add_(momentum, online, alpha=1 - m)
        else:  # the reference's per-parameter loop (benchmark baseline)
            for p, p_m in zip(online, momentum):
                p_m.data = p_m.data * m + p.data * (1.0 - m)

    # ----------------------------------------------------------------- training step

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                mlm_ids: torch.Tensor, mlm_labels: torch.Tensor, alpha: float = 0.0,
                image_ids: Optional[torch.Tensor] = None, gather=SINGLE_PROCESS,
                itm_negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None,
                mlm_normalizer: Optional[torch.Tensor] = None) -> dict:
        """One ALBEF training forward: ITC (+MoD, queue), ITM on hard negatives, MLM (+MoD).

        itm_negatives: optional fixed (negative text index, negative image index) per local
        row, as indices into the ITM candidates (the global batch in global mode); by default
        they are sampled. Returns losses and detached diagnostics.
        """
        cfg = self.cfg
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        temp = self.temp
        bs = images.shape[0]
        rank_offset = gather.rank * bs

        with self._phase("image_encoder"):
            image_embeds = self.encode_image(images)
            image_feat = self.image_feat(image_embeds)
        with self._phase("text_encoder"):
            text_embeds = self.encode_text(text_ids, text_mask)
            text_feat = self.text_feat(text_embeds, text_mask)

        with torch.no_grad(), self._phase("momentum_and_gathers"):
            image_embeds_m = self.encode_image(images, momentum=True)
            image_feat_m = self.image_feat(image_embeds_m, momentum=True)
            text_feat_m = self.text_feat(self.encode_text(text_ids, text_mask, momentum=True), text_mask,
                                         momentum=True)
            # One gather per micro-step: the global batch's momentum features feed the
            # queue on every rank (so queues never diverge) and the in-batch candidates.
            image_feat_m_all = gather.gather(image_feat_m)
            text_feat_m_all = gather.gather(text_feat_m)
            ids_all = gather.gather(image_ids) if image_ids is not None else None
            if cfg.itc_candidates == "pool":
                batch_image_m, batch_text_m, offset = image_feat_m_all, text_feat_m_all, rank_offset
            else:
                batch_image_m, batch_text_m, offset = image_feat_m, text_feat_m, 0
            image_cands = torch.cat([batch_image_m, self.image_queue.t().to(batch_image_m.dtype)])
            text_cands = torch.cat([batch_text_m, self.text_queue.t().to(batch_text_m.dtype)])
            if cfg.itc_id_positives and image_ids is not None:
                batch_ids = ids_all if cfg.itc_candidates == "pool" else image_ids
                pos_targets = losses.id_targets(image_ids, torch.cat([batch_ids, self.idx_queue[0]]))
            else:
                pos_targets = losses.diagonal_targets(bs, image_cands.shape[0], offset, images.device)

        with self._phase("itc"):
            loss_itc, sim_i2t, sim_t2i = losses.itc_loss(
                image_feat, text_feat, image_feat_m, text_feat_m, image_cands, text_cands,
                pos_targets, temp, alpha)
            # The queues share one pointer: earlier writes advance a copy, the last the pointer.
            if cfg.itc_id_positives and ids_all is not None:
                losses.enqueue(self.idx_queue, self.queue_ptr.clone(), ids_all[:, None])
            losses.enqueue(self.image_queue, self.queue_ptr.clone(), image_feat_m_all)
            losses.enqueue(self.text_queue, self.queue_ptr, text_feat_m_all)

        # ---- ITM on hard negatives
        global_itm = cfg.itm_negatives == "pool"
        itm_offset = rank_offset if global_itm else 0
        pos_idx = itm_offset + torch.arange(bs, device=images.device)
        if itm_negatives is None:
            with torch.no_grad(), self._phase("itm_sampling"):
                cand_text_m = text_feat_m_all if global_itm else text_feat_m
                cand_image_m = image_feat_m_all if global_itm else image_feat_m
                cand_ids = (ids_all if global_itm else image_ids) if image_ids is not None else None
                w_i2t, _ = losses.itm_weights(image_feat @ cand_text_m.t() / temp, pos_idx, image_ids, cand_ids)
                w_t2i, _ = losses.itm_weights(text_feat @ cand_image_m.t() / temp, pos_idx, image_ids, cand_ids)
                neg_text_idx = losses.sample_negatives(w_i2t, generator, cfg.itm_vectorized_sampling)
                neg_image_idx = losses.sample_negatives(w_t2i, generator, cfg.itm_vectorized_sampling)
        else:
            neg_text_idx, neg_image_idx = itm_negatives

        with self._phase("itm_fusion"):
            itm_logits, itm_labels, image_kvs = self._itm(
                image_embeds, text_embeds, text_ids, text_mask, neg_text_idx, neg_image_idx, gather)
            loss_itm = losses.itm_loss(itm_logits, itm_labels)
        with self._phase("mlm"):
            loss_mlm = (self._mlm(mlm_ids, mlm_labels, text_mask, image_embeds, image_kvs,
                                  image_embeds_m, alpha, mlm_normalizer)
                        if cfg.mlm else loss_itc.new_zeros(()))

        with torch.no_grad():
            rows = torch.arange(bs, device=images.device)
            cos = sim_i2t[:, : batch_text_m.shape[0]].detach().float() * temp.detach()
            pos_sim = cos[rows, offset + rows].mean()
            neg_sim = (cos.sum() - cos[rows, offset + rows].sum()) / max(cos.numel() - bs, 1)
            itm_acc = (itm_logits.argmax(dim=1) == itm_labels).float().mean()
        return {
            "loss": loss_itc + loss_itm + loss_mlm,
            "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_mlm": loss_mlm,
            "itm_acc": itm_acc, "pos_sim": pos_sim, "neg_sim": neg_sim,
            "neg_text_idx": neg_text_idx, "neg_image_idx": neg_image_idx,
            "image_feat_m_all": image_feat_m_all, "text_feat_m_all": text_feat_m_all,
        }

    def _itm(self, image_embeds, text_embeds, text_ids, text_mask, neg_text_idx, neg_image_idx, gather):
        """ITM logits over positives and both kinds of negatives; also returns the images'
        cross-attention keys/values (reused by MLM) when they are shared."""
        bs = image_embeds.shape[0]
        pooled = self.cfg.itm_negatives == "pool"
        if pooled:
            # Image embeddings of negatives may live on another rank of the pool: only the
            # drawn rows travel (itm_exchange "rows"; "gather": every rank's embeddings, the
            # O(pool) reference of the tests), with their gradient back to the rank that
            # encoded them. Negative texts travel as ids (cheap) and are re-encoded here.
            if self.cfg.itm_exchange == "rows":
                image_embeds_neg = gather.select_rows(image_embeds, neg_image_idx)
            else:
                image_embeds_neg = gather.gather_with_grad(image_embeds)[neg_image_idx]
            tokens = gather.select_rows(torch.cat([text_ids, text_mask], dim=1), neg_text_idx,
                                        kind="negative_texts")
            neg_ids, neg_mask = tokens.split(text_ids.shape[1], dim=1)
            text_embeds_neg = self.encode_text(neg_ids, neg_mask)
        else:
            image_embeds_neg = image_embeds[neg_image_idx]
            neg_mask = text_mask[neg_text_idx]
            text_embeds_neg = text_embeds[neg_text_idx]

        # Rows: positives, (text, negative image), (negative text, image): labels 1, 0, 0.
        itm_text = torch.cat([text_embeds, text_embeds, text_embeds_neg])
        itm_mask = torch.cat([text_mask, text_mask, neg_mask])
        image_kvs = None
        if self.cfg.share_cross_kv:
            image_kvs = self.cross_kv(image_embeds)
            if pooled:
                neg_kvs = self.cross_kv(image_embeds_neg)
            else:
                neg_kvs = [(k[neg_image_idx], v[neg_image_idx]) for k, v in image_kvs]
            itm_kvs = [(torch.cat([k, kn, k]), torch.cat([v, vn, v]))
                       for (k, v), (kn, vn) in zip(image_kvs, neg_kvs)]
            fused = self.fuse(itm_text, itm_mask, image_kvs=itm_kvs)
        else:
            itm_images = torch.cat([image_embeds, image_embeds_neg, image_embeds])
            fused = self.fuse(itm_text, itm_mask, image_embeds=itm_images)
        labels = torch.cat([torch.ones(bs, dtype=torch.long, device=fused.device),
                            torch.zeros(2 * bs, dtype=torch.long, device=fused.device)])
        return self.itm_logits(fused), labels, image_kvs

    def _mlm(self, mlm_ids, mlm_labels, text_mask, image_embeds, image_kvs, image_embeds_m,
             alpha, normalizer):
        """MLM loss with momentum distillation (the momentum model sees momentum images)."""
        if image_kvs is not None:
            logits = self.mlm_logits(mlm_ids, text_mask, labels=mlm_labels, image_kvs=image_kvs)
        else:
            logits = self.mlm_logits(mlm_ids, text_mask, image_embeds, labels=mlm_labels)
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                logits_m = self.mlm_logits(mlm_ids, text_mask, image_embeds_m, labels=mlm_labels, momentum=True)
        labels = mlm_labels[mlm_labels != losses.IGNORE_INDEX] if logits.dim() == 2 else mlm_labels
        return losses.mlm_loss(logits, labels, logits_m, alpha, normalizer)
