"""``PairDataset``: streaming's ``StreamingDataset`` over our MDS shards, returning
transformed image-caption pairs.

Augmentation randomness is drawn per sample from ``random.Random`` seeded with
(seed, epoch, sample index), where the sample index is the dataset-wide id streaming
hands to ``__getitem__`` and the epoch is streaming's own counter (which its state dict
restores). A resumed run therefore repeats the crops, flips and RandAugment ops of an
uninterrupted one, whatever the number of loader workers.

A record whose image cannot be decoded is skipped: the next readable record (by sample
index) takes its place so every batch keeps its size (cross-rank gathers need fixed
shapes), and the sample is flagged ``skipped=1``; ``PairDataset.num_skipped`` counts them
per process.

With ``decode_on="device"`` a worker decodes nothing: it reads the image header (size; an
unreadable header is skipped as above), draws the sample's ``AugPlan`` from the same RNG
and returns the raw bytes with it (the plan's flip still swaps the caption here);
device_transforms.py applies the plan in the main process.
"""
from __future__ import annotations

import io
import logging
from typing import Optional

import torch
from PIL import Image
from streaming import StreamingDataset

from albef_ds.data.text import clean_caption, swap_left_right
# sample_rng lives beside the transforms (no streaming needed); re-exported here, its old home
from albef_ds.data.transforms import TrainTransform, sample_rng  # noqa: F401

log = logging.getLogger(__name__)

#: how many following records to try when a record is unreadable
MAX_SKIP = 16


#: canonical nodes when data.num_canonical_nodes is unset (and the data has that many shards).
#: Streaming splits the shards into this many contiguous spans and gives each physical node
#: whole spans, so with P nodes dividing 64 a node reads only its 1/P of the shards (1 would
#: make every node read every shard). Not derived from the node count, so a run resumes on
#: any node count with the same sample order (the "relaxed" partition handles counts that do
#: not divide it); a resumed run keeps the value in its loader state in any case.
DEFAULT_CANONICAL_NODES = 64


class PairDataset(StreamingDataset):
    def __init__(self, *, transform: TrainTransform, max_words: int, aug_seed: int,
                 flip_swaps_left_right: bool = False, num_canonical_nodes: Optional[int] = None,
                 shuffle_block_size: Optional[int] = None, decode_on: str = "cpu", **kwargs):
        super().__init__(num_canonical_nodes=num_canonical_nodes, shuffle_block_size=shuffle_block_size, **kwargs)
        if num_canonical_nodes is None:
            # At least a shard per span: fewer shards than spans would repeat samples.
            self.num_canonical_nodes = max(1, min(DEFAULT_CANONICAL_NODES, len(self.shards)))
            if shuffle_block_size is None:  # streaming's own rule, for the value chosen here
                self.shuffle_block_size = max(4_000_000 // self.num_canonical_nodes, 1 << 18)
        self.transform = transform
        self.max_words = max_words
        self.aug_seed = aug_seed
        self.flip_swaps_left_right = flip_swaps_left_right
        self.decode_on = decode_on
        self.num_skipped = 0
        self._epoch: Optional[int] = None

    def _resume_incr_epoch(self):
        # streaming decides the epoch at the start of each __iter__ (in the worker); keep it.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    @property
    def epoch(self) -> int:
        return self._epoch if self._epoch is not None else max(self.next_epoch - 1, 0)

    def _load(self, index: int) -> dict:
        raw = self.get_item(index)
        if self.decode_on == "device":
            with Image.open(io.BytesIO(raw["image"])) as im:  # parses the header only
                return {"raw": raw, "size": im.size}
        with Image.open(io.BytesIO(raw["image"])) as im:
            im.load()
            img = im.convert("RGB")
        return {"raw": raw, "img": img}

    def __getitem__(self, index: int) -> dict:
        skipped = 0
        for attempt in range(MAX_SKIP + 1):
            i = (index + attempt) % self.num_samples
            try:
                loaded = self._load(i)
                break
            except Exception as e:  # a corrupt record: never crash the run
                skipped = 1
                self.num_skipped += 1
                log.warning("skipping unreadable sample %d: %s: %s", i, type(e).__name__, e)
        else:
            raise RuntimeError(f"{MAX_SKIP + 1} consecutive unreadable samples from {index}")
        raw = loaded["raw"]
        rng = sample_rng(self.aug_seed, self.epoch, index)
        if self.decode_on == "device":
            plan = self.transform.plan(*loaded["size"], rng)
            flipped = plan.flip
            # bytearray: a writable copy, which torch.frombuffer needs to own its memory
            image = {"image_bytes": torch.frombuffer(bytearray(raw["image"]), dtype=torch.uint8), "aug": plan}
        else:
            img, flipped = self.transform(loaded["img"], rng)
            image = {"image": img}
        caption = clean_caption(raw["caption"], self.max_words)
        if flipped and self.flip_swaps_left_right:
            caption = swap_left_right(caption)
        return {**image, "caption": caption, "image_id": int(raw["image_id"]),
                "key": raw["key"], "skipped": skipped}
