"""DeepSpeed engine set-up: the JSON config filled from ours, optimizer, schedule.

Values our config owns (batch sizes, gradient accumulation, clipping, precision when set)
are written into the DeepSpeed dict; a JSON that states a different value is an error
naming both sides, so the two files can never silently disagree.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import Config, ConfigError
from .schedule import lr_lambda


def _set_or_check(ds: dict, key: str, value, source: str) -> None:
    if key in ds and ds[key] != "auto" and ds[key] != value:
        raise ConfigError(
            f"DeepSpeed config {source} sets '{key}' = {ds[key]}, but albef-ds config gives "
            f"{value} (train.micro_batch_size x train.grad_accum_steps x world size / train.grad_clip); "
            f"remove the key from the JSON or make them agree")
    ds[key] = value


def precision_of(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def load_ds_config(cfg: Config, world_size: int) -> dict:
    path = Path(cfg.distributed.ds_config)
    if not path.is_file() and not path.is_absolute():
        from ..config import PRESET_DIR  # the shipped ds_configs/, from any working directory
        shipped = PRESET_DIR.parent / path
        path = shipped if shipped.is_file() else path
    if not path.is_file():
        raise ConfigError(f"config key 'distributed.ds_config': DeepSpeed config file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    t = cfg.train
    src = str(path)
    _set_or_check(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, src)
    _set_or_check(ds, "gradient_accumulation_steps", t.grad_accum_steps, src)
    _set_or_check(ds, "train_batch_size", cfg.global_batch(world_size), src)
    if t.grad_clip is not None:
        _set_or_check(ds, "gradient_clipping", t.grad_clip, src)
    if cfg.distributed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.distributed.zero_stage
    if t.precision != "auto":
        stated = precision_of(ds)
        if stated != "fp32" and stated != t.precision:
            raise ConfigError(f"train.precision is {t.precision} but {src} enables {stated}")
        ds.pop("bf16", None)
        ds.pop("fp16", None)
        if t.precision in ("bf16", "fp16"):
            ds[t.precision] = {"enabled": True}
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{src}: remove the '{key}' section: albef-ds builds the optimizer and "
                              f"schedule from the train section of its own config")
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and every other 0-D/1-D tensor."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], cfg: Config, ds: dict):
    """DeepSpeed's fused Adam on accelerators that build it, apex when importable, torch
    AdamW otherwise; DeepSpeed's CPU Adam when the optimizer is offloaded. Returns
    (optimizer, name)."""
    from deepspeed.accelerator import get_accelerator

    t = cfg.train
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    on_cuda = get_accelerator().device_name() == "cuda"
    choice = t.optimizer
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "deepspeed.DeepSpeedCPUAdam"
    if choice in ("auto", "deepspeed") and on_cuda:
        try:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, adam_w_mode=True, **kwargs), "deepspeed.FusedAdam"
        except Exception as e:  # the op failed to build: fall through, loudly when asked for
            if choice == "deepspeed":
                raise RuntimeError(f"train.optimizer=deepspeed but FusedAdam is unavailable: {e}") from e
    if choice in ("auto", "apex") and on_cuda:
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
            return ApexFusedAdam(groups, adam_w_mode=True, **kwargs), "apex.FusedAdam"
        except ImportError as e:
            if choice == "apex":
                raise RuntimeError("train.optimizer=apex but NVIDIA apex is not importable") from e
    if choice == "deepspeed" and not on_cuda:
        raise RuntimeError("train.optimizer=deepspeed needs a CUDA accelerator (or an offload config)")
    fused = on_cuda
    return torch.optim.AdamW(groups, fused=fused, foreach=not fused, **kwargs), \
        f"torch.AdamW({'fused' if fused else 'foreach'})"


def initialize(model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int,
               load_universal: bool = False):
    """deepspeed.initialize with our optimizer and schedule. Returns (engine, ds_config,
    optimizer name). ``load_universal``: the run will load a universal checkpoint (resume
    on another world size), which DeepSpeed must know at initialisation."""
    import deepspeed

    ds = load_ds_config(cfg, world_size)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    optimizer, opt_name = build_optimizer(param_groups(model, cfg.train.weight_decay), cfg, ds)
    t = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, dist_init_required=False)
    return engine, ds, opt_name


@torch.no_grad()
def clamp_master(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter where the optimizer keeps it: DeepSpeed's fp32 master under ZeRO
    (and bf16/fp16), which overwrites the module's copy at every step, so a clamp of the
    module's copy alone (the reference's, in the forward) lets the master drift past the
    bound. Each rank clamps the part of the master it holds: no collective."""
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's fp32 partition (padding clamped too: unused)
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2: a view of the flat fp32 partition
        param._hp_mapping.get_hp_fragment().clamp_(low, high)
    else:  # this rank holds no piece of the master, or no DeepSpeed optimizer wraps it
        param.data.clamp_(low, high)


def engine_dtype(ds: dict) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision_of(ds)]


def clean_shared_memory_leftovers(launch, shm: Path = Path("/dev/shm")) -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer, which DeepSpeed leaves in
    /dev/shm. Its name holds the user id, the master address and port, and the rank
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``): only this run's, never
    another job's on the same host."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{launch.master_addr}_{launch.master_port}_{launch.rank}"
    try:
        (shm / name).unlink()
    except OSError:
        pass
