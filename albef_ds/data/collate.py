"""Batching with tokenisation: samples -> a dict of tensors (plus the keys)."""
from __future__ import annotations

import torch

from .text import encode_texts


class Collate:
    """Stack images and tokenise captions in ``text_form`` (data.text_form), always padded to
    exactly ``max_tokens`` (fixed shapes across ranks and steps). The first entry is
    ``image``: streaming's loader counts the samples of a batch by the length of the first value."""

    def __init__(self, tokenizer, max_tokens: int, text_form: str):
        self.tokenizer, self.max_tokens, self.text_form = tokenizer, max_tokens, text_form

    def __call__(self, samples: list[dict]) -> dict:
        ids, mask = encode_texts(self.tokenizer, [s["caption"] for s in samples], self.max_tokens, self.text_form)
        first = {"image": torch.stack([s["image"] for s in samples])} if "image" in samples[0] \
            else device_plan(samples)
        return {
            **first,
            "text_ids": ids,
            "text_mask": mask,
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples],
            "skipped": torch.tensor([s["skipped"] for s in samples], dtype=torch.int64),
        }


def device_plan(samples: list[dict]) -> dict:
    """The device path's image entries (data.decode_on: device): ``image_bytes`` (a list of B
    uint8 tensors, first: its length is the batch size) and each sample's AugPlan as tensors,
    ``aug_box`` int64 [B, 4] (top, left, h, w), ``aug_flip`` bool [B], ``aug_ops`` int64
    [B, n] (index into RANDAUG_OPS, -1: empty slot) and ``aug_sign`` float32 [B, n]."""
    from albef_ds.data.transforms import RANDAUG_OPS

    plans = [s["aug"] for s in samples]
    n = max([len(p.ops) for p in plans] + [0])
    ops = torch.full((len(plans), n), -1, dtype=torch.int64)
    sign = torch.ones((len(plans), n), dtype=torch.float32)
    for i, p in enumerate(plans):
        for j, (op, sg) in enumerate(p.ops):
            ops[i, j], sign[i, j] = RANDAUG_OPS.index(op), sg
    return {"image_bytes": [s["image_bytes"] for s in samples],
            "aug_box": torch.tensor([list(p.box) for p in plans], dtype=torch.int64),
            "aug_flip": torch.tensor([p.flip for p in plans], dtype=torch.bool),
            "aug_ops": ops, "aug_sign": sign}
