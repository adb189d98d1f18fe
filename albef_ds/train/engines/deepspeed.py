"""The DeepSpeed engine (``distributed.engine: deepspeed``), the one module that imports
DeepSpeed: engine set-up, the step, checkpoints, universal conversion, consolidation, ZeRO-3
gathers and the partition views the EMA updates, behind the protocol of :mod:`.base`.

Values our config owns (batch sizes, gradient accumulation, clipping, precision when set)
are written into the DeepSpeed dict; a JSON that states a different value is an error
naming both sides, so the two files can never silently disagree.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ...config import Config, ConfigError
from ..schedule import lr_lambda
from .optim import on_itm_path, param_groups  # noqa: F401 (on_itm_path: re-exported)


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
    from ...presets import ds_config_path
    path = ds_config_path(cfg.distributed.ds_config)
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


class DeepSpeedEngine:
    """A DeepSpeed engine around ``model`` with our optimizer and schedule.
    ``load_universal``: the run will load a universal checkpoint (resume on another world
    size), which DeepSpeed must know at initialisation."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int,
                 load_universal: bool = False):
        import deepspeed

        ds = load_ds_config(cfg, world_size)
        if load_universal:
            ds.setdefault("checkpoint", {})["load_universal"] = True
        groups = param_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.itm_lr_scale)
        # each group's (base lr, weight decay) under this config: a resume writes them back
        # over the checkpoint's (apply_settings)
        self.group_settings = [(g.get("lr", cfg.train.lr), g["weight_decay"]) for g in groups]
        optimizer, self.optimizer_name = build_optimizer(groups, cfg, ds)
        t = cfg.train
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds, dist_init_required=False)
        self.ds_config = ds
        self.module = self.engine.module
        self.zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
        self.precision = precision_of(ds)
        self.dtype = engine_dtype(ds)

    # ------------------------------------------------------------------ the step
    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """The engine's step (an optimizer step at an accumulation boundary); returns whether
        it was one."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def train(self) -> None:
        self.engine.train()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: Path, tag: str, client_state: dict) -> None:
        # Needed by DeepSpeed's universal-checkpoint converter (resume on another world size).
        client_state = {**client_state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, tag_dir: Path) -> dict | None:
        """DeepSpeed's state from ``tag_dir``; the client state, or None when nothing loaded."""
        path, client_state = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                         load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        return None if path is None else (client_state or {})

    def apply_settings(self, cfg: Config, total_steps: int) -> None:
        """After a checkpoint loaded: DeepSpeed restored the optimizer's hyperparameters and
        the scheduler's base rates as they were saved; this config's are written back over
        them (base lr per group, weight decay, betas), and the current rate re-derived from
        the schedule of this config at the resumed step."""
        t = cfg.train
        schedule = lr_lambda(total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps)
        scheduler = self.engine.lr_scheduler
        groups = self.engine.optimizer.param_groups
        if len(groups) != len(self.group_settings):
            raise ConfigError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this config "
                              f"{len(self.group_settings)} (train.itm_lr_scale?)")
        for i, (group, (base, decay)) in enumerate(zip(groups, self.group_settings)):
            group.update(weight_decay=decay, betas=tuple(t.betas), initial_lr=base)
            scheduler.base_lrs[i] = base
            group["lr"] = base * schedule(scheduler.last_epoch)

    def scalar(self, param: torch.nn.Parameter) -> float:
        """A one-element parameter's value outside the forward: gathered first where ZeRO-3
        partitions it (a collective: every rank calls it)."""
        if hasattr(param, "ds_id") and param.numel() != full_numel(param):
            import deepspeed
            with deepspeed.zero.GatheredParameters([param]):
                return float(param.detach().float().reshape(-1)[0])
        return float(param.detach().float().reshape(-1)[0])

    def gathered_parameters(self):
        """A context in which every weight is whole on this rank (ZeRO-3 partitions gathered
        for an evaluation's forwards); a no-op below stage 3."""
        return gathered_parameters(self.module, self.zero_stage)

    def clamp_master(self, param: torch.nn.Parameter, low: float, high: float) -> None:
        clamp_master(param, low, high)

    def meta(self) -> dict:
        """What the checkpoint record keeps of this engine (a resume must match it)."""
        return {"zero_stage": self.zero_stage, "precision": self.precision}

    def describe(self) -> str:
        return (f"engine deepspeed; ZeRO stage {self.zero_stage}; precision {self.precision}; "
                f"optimizer {self.optimizer_name}")

    # ------------------------------------------------------------------ the EMA's views
    is_partitioned = staticmethod(lambda p: is_partitioned(p))
    local_partition = staticmethod(lambda p: local_partition(p))
    partition_slice = staticmethod(lambda p, flat_full, dp_rank: partition_slice(p, flat_full, dp_rank))
    full_shape = staticmethod(lambda p: full_shape(p))
    full_numel = staticmethod(lambda p: full_numel(p))

    # ------------------------------------------------------------------ without an engine
    @staticmethod
    def record(cfg: Config, world_size: int) -> dict:
        """The values of :meth:`meta` a run of ``cfg`` would have (before any engine is built)."""
        ds = load_ds_config(cfg, world_size)
        return {"zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "precision": precision_of(ds)}

    #: why a checkpoint's stage and precision must match this run's
    record_reason = ("distributed.ds_config / distributed.zero_stage / train.precision: DeepSpeed loads a "
                     "checkpoint into the stage and precision that wrote it")

    @staticmethod
    def convert_for_world(tag_dir: Path, out: Path) -> None:
        """Another world size loads a universal conversion of the checkpoint."""
        to_universal(tag_dir, out)

    @staticmethod
    def consolidated_fp32_state(tag_dir: Path) -> dict:
        return consolidated_fp32_state(tag_dir)

    @staticmethod
    def release_local(launch) -> None:
        clean_shared_memory_leftovers(launch)


def gathered_parameters(module: torch.nn.Module, zero_stage: int):
    import contextlib
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal: a checkpoint another world size can load."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(tag_dir), "--output_folder", str(out),
                           "--inject_missing_state"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")


def consolidated_fp32_state(tag_dir: Path) -> dict:
    """The online weights in fp32 from a (ZeRO-sharded) checkpoint's optimizer partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


# ---------------------------------------------------------------------- ZeRO-3 partition views

def is_partitioned(p: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 holds only a partition of ``p`` here (``ds_tensor``), not the whole
    tensor: parameters under ``stage3_param_persistence_threshold`` stay whole (``ds_persist``)."""
    return getattr(p, "ds_tensor", None) is not None and not getattr(p, "ds_persist", False)


def local_partition(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's ZeRO-3 partition storage of ``p`` (None when it has none)."""
    return getattr(p, "ds_tensor", None)


def partition_slice(p: torch.nn.Parameter, flat_full: torch.Tensor, dp_rank: int) -> tuple[torch.Tensor, int]:
    """The part of a flattened full tensor that data-parallel rank ``dp_rank``'s partition
    holds (ZeRO-3 splits the flattened, padded parameter evenly by data-parallel rank)."""
    n = p.ds_tensor.numel()
    start = dp_rank * n
    return flat_full[start:start + n], start


def full_shape(p: torch.nn.Parameter) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a partition here."""
    return getattr(p, "ds_numel", None) or p.numel()


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


def fused_adam_status() -> dict:
    """(albef-ds gpu-check) DeepSpeed's FusedAdam op: compatible with this build, and built/loaded (JIT with
    ninja when the wheel has no prebuilt op: that takes a minute, once)."""
    out = {}
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder
        builder = FusedAdamBuilder()
        out["compatible"] = bool(builder.is_compatible())
        t = time.perf_counter()
        builder.load()
        out.update(loaded=True, load_s=time.perf_counter() - t)
    except Exception as e:  # report it: the Trainer then falls back to torch's fused AdamW
        out.update(loaded=False, error=" ".join(str(e).split())[:300])
    return out
