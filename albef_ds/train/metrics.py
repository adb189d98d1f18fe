"""Training metrics: TensorBoard scalars and ``metrics.jsonl`` lines, the same numbers.

Losses stay on the device between log steps (a running sum per key), so a step costs no
host sync; at a log step they are averaged over steps and reduced over ranks at once.

Every ``metrics.jsonl`` row holds ``step`` and ``time`` (:data:`TIME_KEY`: when it was
written, Unix seconds). A launch that resumes from a checkpoint first writes a marker row
``{"step": N, "time": ..., "event": "resume", "from": CHECKPOINT, "world_size": W}``: the
rows after it were computed by that launch, from step N + 1 on. Readers of training rows
skip rows with an ``event`` (:func:`is_event`).
"""
from __future__ import annotations

import json
import os
import time
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


def rewind_jsonl(path: Path, last_step: int, step_key: str = "step") -> None:
    """Drop the lines of ``path`` past ``last_step`` (steps a resumed run will redo),
    atomically, so the file reads as one run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get(step_key, 0) <= last_step]
    tmp = path.with_name(path.name + ".rewind")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


#: the field of every metrics.jsonl row holding when it was written: Unix seconds (wall
#: clock), to the millisecond: how long steps, evaluations and the gaps between launches took
TIME_KEY = "time"
#: the ``event`` of the row a launch that resumes from a checkpoint writes first
RESUME_EVENT = "resume"


def is_event(row: dict) -> bool:
    """Whether a metrics.jsonl row marks an event (a resume) rather than holding metrics."""
    return "event" in row


def _now() -> float:
    return round(time.time(), 3)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger. ``resume_step``: the run resumes
    after that step, so later lines of an earlier launch are dropped from metrics.jsonl
    and TensorBoard purges its later events (``purge_step``): curves read as one run."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            rewind_jsonl(run_dir / "metrics.jsonl", resume_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._write({"step": step, TIME_KEY: _now(), **{k: _py(v) for k, v in values.items()}})
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def mark_resume(self, step: int, checkpoint: str | os.PathLike, world_size: int) -> None:
        """The marker row of a launch that resumed from ``checkpoint`` after ``step``."""
        if self.enabled:
            self._write({"step": step, TIME_KEY: _now(), "event": RESUME_EVENT, "from": str(checkpoint),
                         "world_size": world_size})

    def _write(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def format_log_line(step: int, total: int, values: dict, loss_keys, eta_s: Optional[float],
                    memory_kind: str = "peak") -> str:
    """One plain log line (what a SLURM log or a file holds; no '\\r'), as torchtitan and the
    HF Trainer print: step/total, the objective's progress loss terms, lr, pairs/s,
    achieved TFLOP/s (and MFU when the device's peak is known), memory when known, ETA."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}"]
    losses = " ".join(f"{k.replace('loss_', '')} {values[k]:.4f}" for k in loss_keys if k in values)
    if losses:
        parts.append(losses)
    if "lr" in values:
        parts.append(f"lr {values['lr']:.3g}")
    if "pairs_per_s" in values:
        parts.append(f"{values['pairs_per_s']:.1f} pairs/s")
    if "achieved_tflops" in values:
        flops = f"{values['achieved_tflops']:.3g} TFLOP/s"
        if values.get("mfu") is not None:
            flops += f" (MFU {100 * values['mfu']:.1f}%)"
        parts.append(flops)
    if values.get("memory_gb") is not None:
        parts.append(f"mem {values['memory_gb']:.2f} GiB {memory_kind}")
    parts.append(f"ETA {_duration(eta_s)}" if eta_s is not None else "ETA ?")
    return " | ".join(parts)
