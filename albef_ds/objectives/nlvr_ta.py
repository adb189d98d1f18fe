"""NLVR2's "text assignment" pre-fine-tuning (the reference's Pretrain_nlvr.py): on
pretraining pairs, each caption is shown with two images and the two-image fusion
encoder learns which one it describes: the left (label 0), the right (1), or neither (2).

Per caption, with probability 2/3 its own image is paired with another one (on either
side, evenly), else two other images are shown; the other images are drawn by visual
similarity (softmax of image-feature similarity / 0.07, own image excluded), so they are
hard. The head ``ta_head`` is a linear layer on the fused [CLS]; the loss is plain
cross-entropy (no distillation). Draws come from the Trainer's generator: a resumed run
draws what the uninterrupted one drew. The reference trains it one epoch on its 4M pairs,
then fine-tunes NLVR2 from the checkpoint (``albef-ds finetune --task nlvr2 --init`` it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import at_least_fp32
from .base import Objective, StepContext, images_and_texts
from .nlvr2 import make_two_image_encoders

#: the similarity temperature the reference uses to weight the other images
SIMILARITY_TEMP = 0.07


def assign_images(image_feat: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left index, right index, label) per row: label 0/1 where the row's own image is on
    the left/right, 2 where neither is. ``image_feat``: [B, D] normalised features."""
    b = image_feat.shape[0]
    feat = at_least_fp32(image_feat)
    weights = F.softmax(feat @ feat.t() / SIMILARITY_TEMP, dim=1)
    weights.fill_diagonal_(0)
    others = torch.multinomial(weights, 2, generator=generator)  # two distinct other images per row
    u = torch.rand(b, 2, generator=generator, device=image_feat.device)
    own = torch.arange(b, device=image_feat.device)
    with_own = u[:, 0] > 1 / 3
    own_left = u[:, 1] > 0.5
    left = torch.where(with_own & own_left, own, others[:, 0])
    right = torch.where(with_own & ~own_left, own, torch.where(with_own, others[:, 0], others[:, 1]))
    label = torch.where(with_own, torch.where(own_left, 0, 1), 2)
    return left, right, label


class TextAssignmentObjective(Objective):
    name = "nlvr_ta"
    reports_pretraining_flops = False
    log_keys = ("loss", "acc")
    progress_keys = ("loss", "acc")
    #: what the reference's model (model_pretrain_nlvr.py) does not have: momentum copies (no
    #: distillation in this stage), the ITM and MLM heads, the queues. Its projections and
    #: temperature it has (and the image-similarity draws read vision_proj): not optional.
    unused_parts = ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m", "itm_head",
                    "image_queue", "text_queue", "queue_ptr", "idx_queue", "text_encoder.cls", "text_encoder_m.cls")
    head_prefixes = ("ta_head",)
    reference_layout = ("temp", "visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "ta_head.")
    reference_text_is_bert_model = True
    config_overrides = ("model.mlm=false",)

    def extend_model(self, model) -> None:
        make_two_image_encoders(model)
        model.add_head("ta_head", nn.Linear(model.cfg.text_width, 3))

    def make_evaluator(self, cfg, tokenizer):
        return None  # the reference evaluates NLVR2 after fine-tuning, not this stage

    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        inputs = images_and_texts(batch, ctx)
        inputs.pop("image_ids")
        inputs["generator"] = ctx.generator
        return inputs

    def compute(self, model, images, text_ids, text_mask, generator) -> dict:
        image_embeds = model.encode_image(images)
        with torch.no_grad():
            left, right, labels = assign_images(model.image_feat(image_embeds), generator)
        text = model.encode_text(text_ids, text_mask)
        fused = model.fuse(text, text_mask, [image_embeds[left], image_embeds[right]])
        logits = model.ta_head(fused[:, 0])
        loss = F.cross_entropy(at_least_fp32(logits), labels)
        return {"loss": loss, "acc": (logits.detach().argmax(1) == labels).float().mean()}
