"""Downstream-task data: annotation JSON in the reference ALBEF layouts -> examples ->
augmented, tokenised batches, through a loader that resumes mid-epoch.

Each task (albef_ds/objectives/<task>.py) says how one JSON entry becomes an example
(:class:`BadEntry` for one it cannot use) and how examples become a batch; this module does
the rest the same way for every task:

- :func:`read_examples`: every entry checked; bad ones are skipped, counted by reason and
  named (file, entry number, what is wrong), as ``albef-data convert`` reports rejects. A
  file with no usable entry is an error.
- :class:`TaskLoader`: examples shuffled per epoch by (seed, epoch), split over ranks in
  equal shares, per-sample augmentation seeded by (seed, epoch, example index) as the
  pretraining loader does, and a ``state_dict`` of (epoch, batches consumed) so that a
  resumed run sees exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .dataset import sample_rng

log = logging.getLogger(__name__)

#: entries named per reason in the skipped-entries report
NAMED_PER_REASON = 3


class BadEntry(ValueError):
    """One annotation entry a task cannot use: ``reason`` (a short name, counted) and what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def require(entry, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise BadEntry("not_an_object", f"expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise BadEntry("missing_key", "no " + ", ".join(repr(k) for k in missing))


def text_field(entry: dict, key: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise BadEntry("empty_text", f"{key!r} is {value!r}")
    return value


@dataclass
class ReadReport:
    path: str
    total: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> ["entry 3: no 'label'", ...]

    def add(self, index: int, bad: BadEntry) -> None:
        self.reasons[bad.reason] += 1
        named = self.examples.setdefault(bad.reason, [])
        if len(named) < NAMED_PER_REASON:
            named.append(f"entry {index}: {bad.detail}")

    def __str__(self) -> str:
        line = f"{self.path}: {self.kept} of {self.total} entries used"
        if self.reasons:
            parts = [f"{reason} {n} ({'; '.join(self.examples[reason])}{'; ...' if n > NAMED_PER_REASON else ''})"
                     for reason, n in self.reasons.most_common()]
            line += "; skipped: " + ", ".join(parts)
        return line


def read_examples(path: str | os.PathLike, parse: Callable[[dict], dict],
                  report_to: Callable[[str], None] = print) -> tuple[list[dict], ReadReport]:
    """Parse every entry of a JSON list with ``parse(entry) -> example`` (raising
    :class:`BadEntry`); returns the examples (each with its entry number as ``index``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    report = ReadReport(str(path), total=len(entries))
    examples = []
    for i, entry in enumerate(entries):
        try:
            example = parse(entry)
        except BadEntry as bad:
            report.add(i, bad)
            continue
        example["index"] = i
        examples.append(example)
    report.kept = len(examples)
    if report.reasons or not examples:
        report_to(str(report))
    if not examples:
        raise ConfigError(f"{path}: no usable entry ({report})")
    return examples, report


def read_train_examples(cfg, parse: Callable[[dict], dict], rank: int) -> list[dict]:
    """The examples of every ``task.train_files`` entry (rank 0 reports skipped entries)."""
    log = print if rank == 0 else (lambda *a: None)
    return [e for path in cfg.task.train_files for e in read_examples(path, parse, log)[0]]


def task_train_transform(cfg, flip: bool = True):
    """The fine-tuning crop (task.crop_scale_min) with the data section's RandAugment."""
    from .transforms import TrainTransform
    d = cfg.data
    return TrainTransform(cfg.model.image_res, cfg.task.crop_scale_min, d.randaugment, d.randaugment_n,
                          d.randaugment_m, flip=flip)


def image_root_of(cfg_root: Optional[str], annotation: str | os.PathLike) -> Path:
    return Path(cfg_root) if cfg_root else Path(annotation).parent


def open_image(root: Path, name: str) -> Image.Image:
    """``root/name``; a name without a file extension (SNLI-VE's Flickr ids) tries ``.jpg``."""
    path = root / name
    if not path.suffix and not path.exists():
        path = path.with_suffix(".jpg")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path} (task.image_root is {root})") from None


class TaskDataset(torch.utils.data.Dataset):
    """Examples -> samples via ``load(example, rng)``; ``rng`` is the per-sample
    augmentation RNG of (seed, epoch, example index)."""

    def __init__(self, examples: list[dict], load: Callable, seed: int):
        self.examples, self.load, self.seed = examples, load, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        example = self.examples[i]
        return self.load(example, sample_rng(self.seed, self.epoch, example["index"]))


class _Order(torch.utils.data.Sampler):
    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TaskLoader:
    """Fixed-size batches of this rank's share of a shuffled epoch; resumable.

    Every rank gets ``len(examples) // (world * batch)`` batches per epoch (the tail is
    dropped so every rank takes the same number of steps), global batch k being the k-th
    run of world x batch examples of the epoch's order. ``state_dict()`` after a step
    says where the next batch starts; ``load_state_dict`` on a fresh loader resumes there.
    """

    def __init__(self, dataset: TaskDataset, collate, batch_size: int, rank: int, world: int,
                 shuffle_seed: int, shuffle: bool = True, num_workers: int = 0, pin_memory: bool = False):
        if len(dataset) < batch_size * world:
            raise ConfigError(f"{len(dataset)} training examples are fewer than one global micro-batch "
                              f"(train.micro_batch_size {batch_size} x {world} ranks)")
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.rank, self.world, self.shuffle_seed, self.shuffle = rank, world, shuffle_seed, shuffle
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.worker_init_fn = None
        self.epoch, self.batches_done = 0, 0

    def __len__(self) -> int:
        return len(self.dataset) // (self.world * self.batch_size)

    def _indices(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        order = (np.random.default_rng([self.shuffle_seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        # Global batch k is order[k*W*B : (k+1)*W*B], rank r taking its r-th B: the examples
        # done after k steps are a prefix of the epoch's order at any world size.
        b, w = self.batch_size, self.world
        return [int(order[(k * w + self.rank) * b + j]) for k in range(len(self)) for j in range(b)]

    def __iter__(self):
        self.dataset.epoch = self.epoch
        indices = self._indices(self.epoch)[self.batches_done * self.batch_size:]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=_Order(indices), collate_fn=self.collate,
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True,
            worker_init_fn=self.worker_init_fn, persistent_workers=False)
        for batch in loader:
            self.batches_done += 1
            yield batch
        self.epoch, self.batches_done = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world": self.world,
                "batch_size": self.batch_size, "examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("examples") != len(self.dataset):
            raise ConfigError(f"the training annotation has {len(self.dataset)} usable examples, the "
                              f"checkpoint's had {state.get('examples')}: resume with the same task.train_files")
        self.epoch = int(state["epoch"])
        # Another world size or batch: the examples done are a prefix of the epoch's order;
        # batches restart at the last whole new global batch inside it.
        done = int(state["batches_done"]) * int(state["batch_size"]) * int(state["world"])
        self.batches_done = done // (self.batch_size * self.world)


def build_task_loader(cfg, examples: list[dict], load: Callable, collate, rank: int, world: int) -> TaskLoader:
    d = cfg.data
    return TaskLoader(TaskDataset(examples, load, cfg.train.seed), collate, cfg.train.micro_batch_size, rank,
                      world, d.shuffle_seed, d.shuffle, d.num_workers, d.pin_memory and torch.cuda.is_available())
