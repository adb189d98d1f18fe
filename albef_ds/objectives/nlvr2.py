"""NLVR2: is the sentence true of the pair of images? The fusion encoder reads both
images: each pretrained fusion layer becomes two consecutive blocks, one per image, with
shared cross-attention key/value projections (albef_ds/models/bert.py, ``images_per_text``;
the reference's model_nlvr.py), and a 2-way classifier reads the fused [CLS]; momentum
distillation as in VE. Accuracy on dev / test-P (paper: 80.50 / 83.14 % test-P, 4M / 14M).

The reference first trains the two-image encoder one epoch on pretraining pairs with the
"text assignment" task (objective ``nlvr_ta``, albef_ds/objectives/nlvr_ta.py), then
fine-tunes here from that checkpoint; starting from a pretraining checkpoint also works.

Annotation (the reference's nlvr_{train,dev,test}.json): ``[{"images": [left, right],
"sentence": str, "label": "True" | "False"}, ...]``.
"""
from __future__ import annotations

import re

import torch

from ..data.tasks import BadEntry, require, text_field
from ..models.bert import BertForMaskedLM, replicate_fusion_layers
from .classify import ClassificationObjective

NLVR_LABELS = ("False", "True")
_LAYER = re.compile(r"^text_encoder(?:_m)?\.(?:bert\.)?encoder\.layer\.(\d+)\.")


def make_two_image_encoders(model) -> None:
    """Replace the text encoder (and its momentum copy) by two-image versions holding the
    current weights, each fusion layer copied into both of its blocks (as the reference
    initialises NLVR2 from a pretraining checkpoint). Idempotent."""
    for name in ("text_encoder", "text_encoder_m"):
        old = getattr(model, name)
        if old.bert.images_per_text == 2:
            continue
        new = BertForMaskedLM(model.cfg, images_per_text=2)
        state = replicate_fusion_layers(old.state_dict(), model.cfg.fusion_layer, 2)
        new.load_state_dict(state)
        new.requires_grad_(any(p.requires_grad for p in old.parameters()))
        setattr(model, name, new)


def has_two_image_encoder(state_dict: dict, text_depth: int) -> bool:
    """A checkpoint whose text encoder has more layers than one image needs (NLVR2's)."""
    return any(int(m.group(1)) >= text_depth for m in map(_LAYER.match, state_dict) if m)


def two_image_cls(model, images: torch.Tensor, text_ids, text_mask, momentum: bool) -> torch.Tensor:
    """Fusion [CLS] of each sentence over its two images: ``images`` [B, 2, 3, R, R]."""
    b = images.shape[0]
    embeds = model.encode_image(images.flatten(0, 1), momentum).unflatten(0, (b, 2))
    text = model.encode_text(text_ids, text_mask, momentum)
    return model.fuse(text, text_mask, [embeds[:, 0], embeds[:, 1]], momentum=momentum)[:, 0]


class NLVR2Objective(ClassificationObjective):
    name = "nlvr2"
    labels = NLVR_LABELS
    images_per_example = 2
    flip = False  # sentences name the images by side ("the left image ...")
    reference_layout = ("visual_encoder.", "text_encoder.", "cls_head.",
                        "visual_encoder_m.", "text_encoder_m.", "cls_head_m.")
    #: the text-assignment head of an nlvr_ta checkpoint
    ignored_checkpoint_parts = ("ta_head",)

    def extend_model(self, model) -> None:
        make_two_image_encoders(model)
        super().extend_model(model)

    def is_task_checkpoint(self, state_dict: dict) -> bool:
        return super().is_task_checkpoint(state_dict) or has_two_image_encoder(state_dict, self.cfg.model.text_depth)

    def parse(self, entry) -> dict:
        require(entry, ("images", "sentence", "label"))
        images = entry["images"]
        if not isinstance(images, list) or len(images) != 2 or not all(isinstance(i, str) and i for i in images):
            raise BadEntry("bad_images", f"images {images!r} is not a list of two file names")
        label = str(entry["label"])  # the reference's files hold "True"/"False" strings
        if label not in NLVR_LABELS:
            raise BadEntry("bad_label", f"label {entry['label']!r} is not True or False")
        return {"images": list(images), "text": text_field(entry, "sentence"), "label": NLVR_LABELS.index(label)}

    def fused_cls(self, model, images, text_ids, text_mask, momentum: bool):
        return two_image_cls(model, images, text_ids, text_mask, momentum)
