"""Weakly-supervised visual grounding (RefCOCO+), as ALBEF does it: fine-tune with ITC +
ITM on referring expressions and their images (no boxes: the retrieval objective, image
ids from the image names), then at test time locate the expression with Grad-CAM on one
fusion layer's cross-attention (albef_ds/models/gradcam.py): the map of the ITM score's
positive-attention gradients, upsampled (bicubic) to the image, scores each proposal box
by sum / area^0.5 and the best box counts if its IoU with the truth is >= 0.5 (the
reference's Grounding.py and grounding_eval). Paper: 58.46 / 65.89 / 46.25 % val / testA /
testB.

Annotation: train ``[{"image", "text", "ref_id"}, ...]`` (the reference's
refcoco+_train.json); val/test add ``"box": [x, y, w, h]`` and ``"proposals": [[x, y, w,
h], ...]`` in pixels of the original image, and optionally ``"split"`` (val / testA / testB:
accuracy per split). The reference keeps those in the REFER toolkit's refs(unc).p /
instances.json and a dets.json of detector proposals: ``albef-data grounding-boxes`` joins
them into this layout; ``albef-data synth-tasks`` writes it directly.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..data import clean_caption, encode_texts, make_eval_transform, swap_left_right
from ..data.collate import Collate
from ..data.tasks import (BadEntry, build_task_loader, image_root_of, open_image, read_examples, read_train_examples,
                          require, task_train_transform, text_field)
from ..errors import ConfigError
from ..losses import at_least_fp32
from ..models.gradcam import gradcam, saved_cross_attention
from .retrieval import RetrievalObjective

#: the reference's area exponent in the box score (grounding_eval's alpha)
AREA_EXPONENT = 0.5
IOU_HIT = 0.5


def iou(a, b) -> float:
    """Intersection over union of two [x, y, w, h] boxes."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def best_box(heat: torch.Tensor, proposals) -> int:
    """Index of the proposal the map ``heat`` [H, W] (image pixels) scores highest:
    sum of the map inside the box / area^0.5 (the reference's rule)."""
    scores = []
    for x, y, w, h in proposals:
        inside = heat[int(y):int(y + h), int(x):int(x + w)]
        scores.append(float(inside.sum()) / max(w * h, 1e-9) ** AREA_EXPONENT)
    return max(range(len(scores)), key=scores.__getitem__)


def _box(value, what: str):
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)
            and value[2] > 0 and value[3] > 0):
        raise BadEntry("bad_box", f"{what} {value!r} is not [x, y, w, h] with w, h > 0")
    return [float(v) for v in value]


def fusion_layer_read(model_cfg, gradcam_layer: int | None) -> int:
    """The fusion layer index (among the fusion layers) Grad-CAM reads: ``task.gradcam_layer``,
    or by default the reference's 3rd, the last but one of a model with fewer than 5 (see
    GroundingObjective.gradcam_layer); ConfigError naming the key when out of range."""
    fusion = model_cfg.text_depth - model_cfg.fusion_layer
    chosen = min(2, max(0, fusion - 2)) if gradcam_layer is None else gradcam_layer
    if not 0 <= chosen < fusion:
        raise ConfigError(f"config key 'task.gradcam_layer': {chosen} is not a fusion layer index "
                          f"(the model has {fusion} fusion layers: 0..{fusion - 1})")
    return chosen


class GroundingObjective(RetrievalObjective):
    name = "grounding"
    data = "task"
    reports_pretraining_flops = False  # ITC + ITM, no MLM: not the pretraining step's work
    #: the reference's grounding checkpoint is its retrieval model (model_retrieval.py)
    reference_layout = "retrieval"

    # ---------------------------------------------------------------- training data
    def parse_train(self, entry) -> dict:
        require(entry, ("image", "text"))
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise BadEntry("bad_image", f"image {entry['image']!r} is not a file name")
        return {"image": entry["image"], "text": text_field(entry, "text")}

    def make_loader(self, cfg, rank, world, local_world, local_rank, run_dir):
        examples = read_train_examples(cfg, self.parse_train, rank)
        ids: dict[str, int] = {}
        for e in examples:  # ITC positives: every expression of the same image (by file name)
            e["image_id"] = ids.setdefault(Path(e["image"]).name, len(ids))
        root = image_root_of(cfg.task.image_root, cfg.task.train_files[0])
        d = cfg.data
        transform = task_train_transform(cfg)

        def load(example: dict, rng: random.Random) -> dict:
            image, flipped = transform(open_image(root, example["image"]), rng)
            text = clean_caption(example["text"], d.max_words)
            if flipped and d.flip_swaps_left_right:
                text = swap_left_right(text)
            return {"image": image, "caption": text, "image_id": example["image_id"], "key": str(example["index"]),
                    "skipped": 0}
        return build_task_loader(cfg, examples, load, Collate(self.tokenizer, d.max_tokens, d.text_form), rank, world)

    # ---------------------------------------------------------------- evaluation
    def parse_eval(self, entry) -> dict:
        require(entry, ("image", "text", "box", "proposals"))
        proposals = entry["proposals"]
        if not isinstance(proposals, list) or not proposals:
            raise BadEntry("bad_box", f"proposals {proposals!r} is not a non-empty list of boxes")
        return {"image": entry["image"], "text": text_field(entry, "text"), "ref_id": entry.get("ref_id"),
                "box": _box(entry["box"], "box"), "proposals": [_box(p, "proposal") for p in proposals],
                "group": entry.get("split")}

    def gradcam_layer(self, model) -> int:
        """Absolute index of the text-encoder layer Grad-CAM reads (task.gradcam_layer
        counts fusion layers; None: the reference's 3rd, or in a model with fewer than 5 fusion
        layers the last but one).

        Not the last when there is another: in the last fusion layer only [CLS]'s row of the
        cross-attention reaches the ITM score (the layer's MLP works position by position), so
        its Grad-CAM is [CLS]'s attention alone, where the reference's layer (3 more after it)
        collects every text token's. Measured on the tiny model (2 fusion layers) fine-tuned on
        the synthetic grounding task, texts as ``[CLS] words``: 42 / 38 % val accuracy on two
        fine-tuning seeds reading fusion layer 0, 17 / 17 % (chance 27 %) reading the last."""
        return model.cfg.fusion_layer + fusion_layer_read(model.cfg, self.cfg.task.gradcam_layer)

    @classmethod
    def check_settings(cls, cfg, evaluates: bool) -> None:
        if evaluates:
            fusion_layer_read(cfg.model, cfg.task.gradcam_layer)

    def maps(self, model, images: torch.Tensor, text_ids, text_mask) -> torch.Tensor:
        """Grad-CAM maps [B, grid, grid] of the ITM score on the configured fusion layer."""
        grid = model.cfg.image_res // model.cfg.patch_size
        with torch.enable_grad(), saved_cross_attention(model.text_encoder.bert, self.gradcam_layer(model)) as attn:
            image_embeds = model.encode_image(images)
            fused = model.fuse(model.encode_text(text_ids, text_mask), text_mask, image_embeds)
            score = model.itm_logits(fused, text_mask)[:, 1].sum()
            # autograd.grad: no parameter gradient is accumulated (the engine's hooks stay idle)
            (grads,) = torch.autograd.grad(score, attn.attention_map)
        return gradcam(attn.attention_map.detach(), grads, text_mask, (grid, grid)).detach()

    def evaluator_for(self, path: str, log=print):
        from ..eval.tasks import TaskEvaluator
        cfg = self.cfg
        examples = read_examples(path, self.parse_eval, log)[0]
        root = image_root_of(cfg.task.image_root, path)
        transform = make_eval_transform(cfg.model.image_res)

        def load(example: dict, rng: Optional[random.Random]) -> dict:
            img = open_image(root, example["image"])
            return {"image": transform(img), "size": (img.height, img.width), "text": clean_caption(example["text"], cfg.data.max_words),
                    "example": example}

        def collate(samples):
            ids, mask = encode_texts(self.tokenizer, [s["text"] for s in samples], cfg.data.max_tokens,
                                     cfg.data.text_form)
            return {"image": torch.stack([s["image"] for s in samples]), "text_ids": ids, "text_mask": mask,
                    "size": [s["size"] for s in samples], "example": [s["example"] for s in samples]}

        def score(model, batch, device):
            dtype = next(model.parameters()).dtype
            maps = at_least_fp32(self.maps(model, batch["image"].to(device, dtype), batch["text_ids"].to(device),
                                           batch["text_mask"].to(device))).cpu()
            out = []
            for m, (h, w), e in zip(maps, batch["size"], batch["example"]):
                heat = F.interpolate(m[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
                pick = best_box(heat, e["proposals"])
                out.append({"ref_id": e["ref_id"], "image": e["image"], "text": e["text"], "box": e["proposals"][pick],
                            "truth": e["box"], "correct": int(iou(e["proposals"][pick], e["box"]) >= IOU_HIT),
                            "group": e["group"], "map": m})
            return out

        # chance: a proposal picked at random hits with probability (#hitting proposals / #proposals)
        chance = sum(sum(iou(p, e["box"]) >= IOU_HIT for p in e["proposals"]) / len(e["proposals"])
                     for e in examples) / len(examples)
        evaluator = TaskEvaluator(self.name, examples, load, collate, score, chance=chance,
                                  batch_size=cfg.eval.batch_size)
        evaluator.results_keys = ("ref_id", "box", "correct")
        evaluator.image_root = root
        return evaluator
