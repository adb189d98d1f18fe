"""Checkpoints that survive a kill at any moment, and resume on any number of ranks, at
a size and a read cost per rank that do not grow with the world size.

Layout under ``RUN_DIR/checkpoints``::

    step_00000200/               a complete checkpoint (renamed from .partial: the commit)
        (DeepSpeed's files)      module states (rank 0), ZeRO partitions (one per rank)
        albef_momentum.pt        fp32 momentum master of the parameters held whole: once
        albef_rank00000.pt       per rank: RNG states, its ZeRO-3 partitions of the master
        albef_queue_pool00000.pt per negatives pool: its queues and pointer
        albef_meta.json          step, world size, global batch, pools
    step_00000400.partial/       a save under way (or killed): never resumed from
    latest                       the tag of the newest complete checkpoint

A save writes into ``<tag>.partial`` and rank 0 renames it to ``<tag>`` once every rank's
files are on disk, so files of an interrupted save (possibly at another world size) can
never mix with a later one. On resume rank 0 picks the tag and broadcasts it; every rank
checks that it sees the same checkpoint (a caching shared file system can show ranks
different folders) before anything is loaded. Each rank then reads DeepSpeed's files for
itself, the shared momentum file, its own rank file and its pool's queue file.
"""
from __future__ import annotations

import json
import os
import re
import random
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .. import distributed as dist_lib
from ..errors import UsageError

#: model buffers that are run state, saved once per negatives pool (they differ between pools)
QUEUE_BUFFERS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")

META = "albef_meta.json"
MOMENTUM_FILE = "albef_momentum.pt"
PARTIAL = ".partial"
TAG_PATTERN = re.compile(r"step_\d{8}")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def queue_file_name(pool: int) -> str:
    return f"albef_queue_pool{pool:05d}.pt"


def rank_file_name(rank: int) -> str:
    return f"albef_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be resumed from, with the reason and the path."""


#: model fields that set a parameter's or buffer's shape: a resume must not change them.
SHAPE_KEYS = ("image_res", "patch_size", "vision_width", "vision_depth", "vision_heads", "vision_mlp_ratio",
              "vocab_size", "text_width", "text_depth", "text_heads", "text_intermediate",
              "max_position_embeddings", "type_vocab_size", "fusion_layer", "embed_dim", "queue_size",
              "itc_id_positives")


def run_record(cfg, world_size: int) -> dict:
    """What a resume must agree with, written into every checkpoint's meta."""
    return {"global_batch": cfg.global_batch(world_size), "tokenizer": cfg.data.tokenizer,
            "text_form": cfg.data.text_form, "model": {k: getattr(cfg.model, k) for k in SHAPE_KEYS}}


def check_resumable(tag_dir: Path, meta: dict, cfg, world_size: int) -> None:
    """Raise ConfigError naming every value this run has that the checkpoint cannot take
    (before anything is written or loaded)."""
    from ..config import ConfigError
    problems = []
    if meta.get("global_batch") not in (None, cfg.global_batch(world_size)):
        problems.append(f"global batch {meta['global_batch']} in the checkpoint, {cfg.global_batch(world_size)} "
                        f"here (train.micro_batch_size x grad_accum_steps x world {world_size}: make them match)")
    saved = meta.get("model", {})
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(cfg.model, key):
            what = f"model.{key}: {saved[key]} in the checkpoint, {getattr(cfg.model, key)} here"
            if key == "vocab_size":
                what += (f" (the tokenizer {cfg.data.tokenizer} has {cfg.model.vocab_size} tokens; the checkpoint "
                         f"was trained with {meta.get('tokenizer')})")
            problems.append(what)
    # a meta without it was written before data.text_form existed: trained on the legacy form
    from ..data.text import LEGACY_TEXT_FORM, text_form_problem
    form = text_form_problem(meta.get("text_form", LEGACY_TEXT_FORM), cfg.data.text_form, "the checkpoint")
    if form:
        problems.append(form)
    if problems:
        raise ConfigError(f"cannot resume from {tag_dir}: " + "; ".join(problems) + "; nothing was changed")


class CheckpointManager:
    """Save, find and load checkpoints. ``collectives``: barrier / broadcast_object /
    all_gather_object (albef_ds.distributed by default; tests hand in fakes)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int,
                 collectives=dist_lib):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.comm = collectives

    # ------------------------------------------------------------------ save
    def save(self, backend, step: int, client_state: dict, files: dict, meta: Optional[dict] = None) -> Path:
        """DeepSpeed's state plus ``files`` (file name -> object, what THIS rank writes) into
        ``<tag>.partial``, renamed to ``<tag>`` by rank 0 when every rank is done."""
        tag = tag_of(step)
        final, partial = self.dir / tag, self.dir / (tag + PARTIAL)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save killed at this step
        self.comm.barrier()
        backend.save_checkpoint(self.dir, partial.name, client_state)
        for name, obj in files.items():
            torch.save(obj, partial / name)
        self.comm.barrier()  # every rank's files are on disk
        if self.rank == 0:
            _atomic_write(partial / META, json.dumps({"step": step, "world_size": self.world_size,
                                                      **(meta or {})}))
            if final.exists():  # the same step saved twice (a best checkpoint, then the periodic one)
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune(just_written=tag)
            # after the pruning, and naming the checkpoint just committed: 'latest' always
            # names a complete checkpoint that exists
            _atomic_write(self.dir / "latest", tag)
        self.comm.barrier()
        return final

    def _prune(self, just_written: str) -> None:
        """Keep the checkpoint just written, the best one, and the newest ``keep_last`` - 1
        others before it; remove partial folders of interrupted saves (this save's own was
        renamed already).

        Checkpoints at higher steps than the one just written are removed whatever
        ``keep_last`` says: they are not this run's past (another run's, or the future of a
        run resumed from an earlier checkpoint, whose metrics were rewound likewise), and
        left there they would sort as newer: rotation would delete the new checkpoints and
        ``--resume auto`` or ``export`` would pick the old one."""
        best = self.dir.parent / "best.json"
        keep = {json.loads(best.read_text())["tag"]} if best.is_file() else set()
        keep.add(just_written)
        others = [t for t in self.complete_tags() if t not in keep]
        ahead = [t for t in others if t > just_written]
        before = [t for t in others if t < just_written]
        room = max(0, self.keep_last - 1)  # the just-written one counts as the newest kept
        for tag in ahead + before[: max(0, len(before) - room)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            shutil.rmtree(self.dir / f"{tag}_universal", ignore_errors=True)
        for stale in self.dir.glob(f"step_*{PARTIAL}"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ find
    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        # Only our own tags: a converted "<tag>_universal" folder holds a copy of the meta too.
        return sorted(p.parent.name for p in self.dir.glob(f"step_*/{META}")
                      if TAG_PATTERN.fullmatch(p.parent.name))

    def _resolve_here(self, resume: str) -> Optional[Path]:
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / META).is_file():
                raise FileNotFoundError(f"--resume {resume}: not a complete albef-ds checkpoint "
                                        f"(no {META} in it)")
            return path
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None

    def resolve(self, resume: str) -> Optional[Path]:
        """'auto' -> the latest complete checkpoint or None; 'none' -> None; else a path.
        Rank 0 decides; every rank must then see that checkpoint, at the same step."""
        error = None
        chosen = None
        if self.rank == 0:
            try:
                chosen = self._resolve_here(resume)
            except FileNotFoundError as e:
                error = str(e)
        error, chosen = self.comm.broadcast_object((error, None if chosen is None else str(chosen)))
        if error:
            raise FileNotFoundError(error)
        if chosen is None:
            return None
        path = Path(chosen)
        seen = json.loads((path / META).read_text())["step"] if (path / META).is_file() else None
        views = self.comm.all_gather_object(seen)
        if len(set(views)) != 1:
            blind = [r for r, v in enumerate(views) if v != views[0]]
            raise CheckpointError(
                f"ranks disagree about checkpoint {path}: rank 0 resumes from step {views[0]}, rank(s) "
                f"{blind} see {[views[r] for r in blind]} (None: no {META}); a shared file system that "
                f"caches directory listings? nothing was loaded")
        return path

    @staticmethod
    def meta(tag_dir: Path) -> dict:
        return json.loads((tag_dir / META).read_text())

    # ------------------------------------------------------------------ load
    def prepare_universal(self, tag_dir: Path) -> Path:
        """Convert a checkpoint from another world size with DeepSpeed's ds_to_universal
        (rank 0, once); every rank then loads DeepSpeed's state from ``<tag>_universal``
        (our own files are read from ``tag_dir``)."""
        out = tag_dir.parent / f"{tag_dir.name}_universal"
        if self.rank == 0 and not (out / "zero").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            from .backend import to_universal
            to_universal(tag_dir, out)
        self.comm.barrier()
        return out

    def load(self, backend, tag_dir: Path, ds_dir: Optional[Path] = None) -> dict:
        """Load the engine's state (from ``ds_dir``, default ``tag_dir``); return the client state."""
        ds_dir = ds_dir or tag_dir
        client_state = backend.load_checkpoint(ds_dir)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {ds_dir}")
        return client_state


def read(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def rank_files(tag_dir: Path) -> Iterator[dict]:
    """Every rank's file of a checkpoint, loaded one at a time (universal resume, export)."""
    for f in sorted(tag_dir.glob("albef_rank*.pt")):
        yield read(f)


def read_queue(tag_dir: Path, pool: int) -> dict:
    """Pool ``pool``'s queues; after a world-size change with more pools than were saved,
    pool p starts from saved pool p mod (saved pools)."""
    saved = max(1, int(CheckpointManager.meta(tag_dir).get("pools", 1)))
    return read(tag_dir / queue_file_name(pool % saved))
