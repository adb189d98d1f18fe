"""What the classification tasks share (SNLI-VE: 3 classes, NLVR2: 2): a two-layer head on
the fusion encoder's [CLS], momentum distillation of its logits (the reference's
``distill``), accuracy on task.val_file, examples read from annotation JSON.

A task subclasses :class:`ClassificationObjective` with its labels, its entry parser and
how the [CLS] state of one example is fused (:meth:`ClassificationObjective.fused_cls`).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..data import clean_caption, encode_texts, make_eval_transform, swap_left_right
from ..data.tasks import (build_task_loader, image_root_of, open_image, read_examples, read_train_examples,
                          task_train_transform)
from ..losses import distilled_cross_entropy
from .base import Objective, StepContext, alpha_at

#: what the classification tasks neither train nor read: the pretraining heads, queues and
#: temperature (a reference VE/NLVR2 checkpoint has none of them)
PRETRAINING_ONLY = ("vision_proj", "vision_proj_m", "text_proj", "text_proj_m", "itm_head", "temp",
                    "image_queue", "text_queue", "queue_ptr", "idx_queue", "text_encoder.cls", "text_encoder_m.cls")


def classifier_head(width: int, classes: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear, the reference's ``cls_head`` (keys cls_head.0.*, cls_head.2.*)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


class ClassificationObjective(Objective):
    data = "task"
    reports_pretraining_flops = False
    log_keys = ("loss", "acc", "alpha")
    progress_keys = ("loss", "acc")
    unused_parts = PRETRAINING_ONLY
    head_prefixes = ("cls_head", "cls_head_m")
    reference_text_is_bert_model = True
    #: class names in label-index order
    labels: tuple = ()
    #: images per example (NLVR2: 2)
    images_per_example = 1
    #: a horizontal flip is allowed in training (with left/right swapped in the text when
    #: data.flip_swaps_left_right); NLVR2's sentences name images by side, so it has none
    flip = True

    # ---------------------------------------------------------------- subclass API
    def parse(self, entry) -> dict:
        """One annotation entry -> {"images": [names], "text": str, "label": int}; raise BadEntry."""
        raise NotImplementedError

    def fused_cls(self, model, images: torch.Tensor, text_ids, text_mask, momentum: bool) -> torch.Tensor:
        """[B, text_width] fusion [CLS] states; ``images`` [B, images_per_example, 3, R, R]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- model
    def extend_model(self, model) -> None:
        model.add_head("cls_head", classifier_head(model.cfg.text_width, len(self.labels)),
                       momentum=self.cfg.task.distill)

    # ---------------------------------------------------------------- data
    def _transform(self, train: bool):
        cfg = self.cfg
        return task_train_transform(cfg, self.flip) if train else make_eval_transform(cfg.model.image_res)

    def sample_loader(self, root: Path, train: bool):
        """``load(example, rng)``: images transformed (rng None: the evaluation transform)."""
        transform = self._transform(train)
        swap = self.cfg.data.flip_swaps_left_right
        max_words = self.cfg.data.max_words

        def load(example: dict, rng: Optional[random.Random]) -> dict:
            text = clean_caption(example["text"], max_words)
            images = []
            flipped = False
            for name in example["images"]:
                img = open_image(root, name)
                if rng is None:
                    images.append(transform(img))
                else:
                    tensor, flipped = transform(img, rng)
                    images.append(tensor)
            if flipped and swap:
                text = swap_left_right(text)
            return {"images": torch.stack(images), "text": text, "label": example["label"],
                    "key": str(example["index"])}
        return load

    def collate(self, samples: list[dict]) -> dict:
        d = self.cfg.data
        ids, mask = encode_texts(self.tokenizer, [s["text"] for s in samples], d.max_tokens, d.text_form)
        return {"image": torch.stack([s["images"] for s in samples]), "text_ids": ids, "text_mask": mask,
                "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
                "key": [s["key"] for s in samples]}

    def read(self, path: str, log=print) -> list[dict]:
        return read_examples(path, self.parse, log)[0]

    def make_loader(self, cfg, rank, world, local_world, local_rank, run_dir):
        examples = read_train_examples(cfg, self.parse, rank)
        root = image_root_of(cfg.task.image_root, cfg.task.train_files[0])
        return build_task_loader(cfg, examples, self.sample_loader(root, train=True), self.collate, rank, world)

    # ---------------------------------------------------------------- step
    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        alpha = alpha_at(ctx.step, ctx.steps_per_epoch, self.cfg.model.alpha, self.cfg.train.alpha_ramp_epochs)
        return {"images": batch["image"].to(ctx.device, dtype=ctx.dtype, non_blocking=True),
                "text_ids": batch["text_ids"].to(ctx.device, non_blocking=True),
                "text_mask": batch["text_mask"].to(ctx.device, non_blocking=True),
                "labels": batch["label"].to(ctx.device, non_blocking=True), "alpha": alpha}

    def logits(self, model, images, text_ids, text_mask, momentum: bool = False) -> torch.Tensor:
        head = model.cls_head_m if momentum else model.cls_head
        return head(self.fused_cls(model, images, text_ids, text_mask, momentum))

    def compute(self, model, images, text_ids, text_mask, labels, alpha) -> dict:
        logits = self.logits(model, images, text_ids, text_mask)
        logits_m = None
        if self.cfg.task.distill:
            with torch.no_grad():
                logits_m = self.logits(model, images, text_ids, text_mask, momentum=True)
        loss = distilled_cross_entropy(logits, labels, logits_m, alpha)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return {"loss": loss, "acc": acc, "alpha": loss.new_tensor(alpha)}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score(self, model, batch: dict, device: torch.device) -> list[dict]:
        dtype = next(model.parameters()).dtype
        logits = self.logits(model, batch["image"].to(device, dtype), batch["text_ids"].to(device),
                             batch["text_mask"].to(device))
        pred = logits.argmax(1).cpu()
        return [{"key": k, "pred": self.labels[int(p)], "label": self.labels[int(t)], "correct": int(p == t)}
                for k, p, t in zip(batch["key"], pred, batch["label"])]

    def evaluator_for(self, path: str, log=print):
        from ..eval.tasks import TaskEvaluator
        examples = self.read(path, log)
        root = image_root_of(self.cfg.task.image_root, path)
        counts = torch.bincount(torch.tensor([e["label"] for e in examples]), minlength=len(self.labels))
        # chance: always answering the most frequent class of this split
        return TaskEvaluator(self.name, examples, self.sample_loader(root, train=False), self.collate,
                             self.score, chance=float(counts.max()) / len(examples),
                             batch_size=self.cfg.eval.batch_size)
