"""Checkpoints that survive a kill at any moment, and resume on any number of ranks.

Layout under ``RUN_DIR/checkpoints``::

    step_00000200/            DeepSpeed's files (module, ZeRO optimizer partitions)
        albef_rank00000.pt    per rank: RNG states, fp32 momentum master, loader state
        albef_meta.json       world size, global batch, step (rank 0, after every rank wrote)
    latest                    the tag of the newest COMPLETE checkpoint

DeepSpeed's own ``latest`` is written by rank 0 before all ranks are known to be done, so
we never let it: ``latest`` is ours, written after a barrier, atomically (tmp + rename).
DeepSpeed saves ``client_state`` from rank 0 only, so everything per rank (RNG, the
ZeRO-3 partition of the momentum master) goes into a file of each rank's own.
"""
from __future__ import annotations

import json
import os
import re
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..distributed import barrier

META = "albef_meta.json"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"albef_rank{rank:05d}.pt"


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


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        tag = f"step_{step:08d}"
        tag_dir = self.dir / tag
        client_state = dict(client_state)
        # Needed by DeepSpeed's universal-checkpoint converter (resume on another world size).
        client_state["universal_checkpoint_info"] = {"universal_checkpoint_version": 0.2}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        _atomic_torch_save(rank_state, rank_file(tag_dir, self.rank))
        barrier()  # every rank's files are on disk
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size,
                    "global_batch": client_state.get("global_batch"),
                    "zero_stage": client_state.get("zero_stage")}
            _atomic_write(tag_dir / META, json.dumps(meta))
            _atomic_write(self.dir / "latest", tag)
            self._prune()
        barrier()
        return tag_dir

    def _prune(self) -> None:
        best = self.dir.parent / "best.json"
        keep = {json.loads(best.read_text())["tag"]} if best.is_file() else set()
        complete = [t for t in self.complete_tags() if t not in keep]
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            shutil.rmtree(self.dir / f"{tag}_universal", ignore_errors=True)

    # ------------------------------------------------------------------ find
    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        # Only our own tags: a converted "<tag>_universal" folder holds a copy of the meta too.
        return sorted(p.parent.name for p in self.dir.glob(f"step_*/{META}")
                      if re.fullmatch(r"step_\d{8}", p.parent.name))

    def resolve(self, resume: str) -> Optional[Path]:
        """'auto' -> the latest complete checkpoint or None; 'none' -> None; else a path."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / META).is_file():
                raise FileNotFoundError(f"--resume {resume}: not a complete albef-ds checkpoint "
                                        f"(no {META} in it)")
            return path
        # The newest checkpoint with its meta file (written after every rank finished) is
        # the commit point; 'latest' may lag it by one if a kill landed between the two writes.
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None

    @staticmethod
    def meta(tag_dir: Path) -> dict:
        return json.loads((tag_dir / META).read_text())

    # ------------------------------------------------------------------ load
    def prepare_universal(self, tag_dir: Path) -> Path:
        """Convert a checkpoint from another world size with DeepSpeed's ds_to_universal
        (rank 0, once); every rank then loads ``<tag>_universal``."""
        out = tag_dir.parent / f"{tag_dir.name}_universal"
        if self.rank == 0 and not (out / "zero").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(tag_dir), "--output_folder", str(out),
                            "--inject_missing_state"], check=True)
            # Our per-rank files (RNG, momentum masters, meta) travel with the converted folder.
            for extra in tag_dir.glob("albef_*"):
                shutil.copy2(extra, out / extra.name)
        barrier()
        return out

    def load(self, engine, tag_dir: Path) -> tuple[dict, list[dict]]:
        """Load DeepSpeed state; return (client_state, every saved rank's state)."""
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        states = [torch.load(f, map_location="cpu", weights_only=False)
                  for f in sorted(tag_dir.glob("albef_rank*.pt"))]
        return client_state or {}, states

