"""SNLI-VE (visual entailment): does the image entail, contradict or not decide the
sentence? A 3-way classifier on the fusion [CLS] (the reference's model_ve.py), with
momentum distillation; accuracy on the dev/test split (paper: 80.30 % on test).

Annotation (the reference's ve_{train,dev,test}.json): ``[{"image": Flickr30K id or path,
"sentence": str, "label": "entailment" | "neutral" | "contradiction"}, ...]``; an image
name without an extension is read as ``<name>.jpg`` (the reference's layout).
"""
from __future__ import annotations

from ..data.tasks import BadEntry, require, text_field
from .classify import ClassificationObjective

#: label order of the reference (its ve_dataset: contradiction 0, neutral 1, entailment 2)
VE_LABELS = ("contradiction", "neutral", "entailment")


class VEObjective(ClassificationObjective):
    name = "ve"
    labels = VE_LABELS
    reference_layout = ("visual_encoder.", "text_encoder.", "cls_head.",
                        "visual_encoder_m.", "text_encoder_m.", "cls_head_m.")

    def parse(self, entry) -> dict:
        require(entry, ("image", "sentence", "label"))
        if entry["label"] not in VE_LABELS:
            raise BadEntry("bad_label", f"label {entry['label']!r} is not one of {', '.join(VE_LABELS)}")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise BadEntry("bad_image", f"image {entry['image']!r} is not a file name")
        return {"images": [entry["image"]], "text": text_field(entry, "sentence"),
                "label": VE_LABELS.index(entry["label"])}

    def fused_cls(self, model, images, text_ids, text_mask, momentum: bool):
        image_embeds = model.encode_image(images[:, 0], momentum)
        text = model.encode_text(text_ids, text_mask, momentum)
        return model.fuse(text, text_mask, image_embeds, momentum=momentum)[:, 0]
