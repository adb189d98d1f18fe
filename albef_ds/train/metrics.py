"""Training metrics: TensorBoard scalars and ``metrics.jsonl`` lines, the same numbers.

Losses stay on the device between log steps (a running sum per key), so a step costs no
host sync; at a log step they are averaged over steps and reduced over ranks at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


class RunningMeans:
    """Device-side sums of scalar tensors, reduced over ranks when read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def read_and_reset(self) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / max(1, self.count)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
        out = dict(zip(keys, stacked.tolist()))
        self.sums, self.count = {}, 0
        return out


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **{k: _py(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()


def _py(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def memory_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # resident set size of this process on CPU
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return None
