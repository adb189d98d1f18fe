"""Batching with tokenisation: samples -> a dict of tensors (plus the keys)."""
from __future__ import annotations

import torch


class Collate:
    """Stack images and tokenise captions, always padded to exactly ``max_tokens`` (fixed
    shapes across ranks and steps). The first entry is ``image``: streaming's loader counts
    the samples of a batch by the length of the first value."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, samples: list[dict]) -> dict:
        text = self.tokenizer([s["caption"] for s in samples], padding="max_length", truncation=True,
                              max_length=self.max_tokens, return_tensors="pt")
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text_ids": text["input_ids"].to(torch.int64),
            "text_mask": text["attention_mask"].to(torch.int64),
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples],
            "skipped": torch.tensor([s["skipped"] for s in samples], dtype=torch.int64),
        }
