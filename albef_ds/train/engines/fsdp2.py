"""The FSDP2 engine (``distributed.engine: fsdp2``), the one module that imports FSDP and
DCP: ``fully_shard`` on every transformer block (online and momentum) and on the root,
mixed precision by :class:`MixedPrecisionPolicy` (parameters gathered in bf16 or fp32,
gradients reduced in fp32), torch's AdamW over the sharded fp32 parameters, and
checkpoints in torch.distributed.checkpoint (DCP) format, which every rank writes its own
shards of and any world size reads without a conversion.

Under FSDP2 each parameter is a DTensor sharded by rows (dim 0): rank ``r`` holds rows
``[r * ceil(n / world), (r + 1) * ceil(n / world))`` of an ``n``-row tensor (none where the
tensor has fewer rows than that), in the parameter's own dtype (fp32). That local shard is
the optimizer's master and the EMA's view: the momentum model's fp32 master is updated
shard by shard, with no gathering, as under ZeRO-3.

Activation checkpointing (``model.activation_checkpointing``) and ``torch.compile`` of the
blocks (``train.compile``) are switches on the model, applied before any engine wraps it.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist

from ...config import Config, ConfigError
from ..schedule import lr_lambda
from .base import WholeTensorViews
from .optim import param_groups

#: the file (rank 0's) beside the DCP shards holding the client state and the schedule
CLIENT_FILE = "fsdp2_client.pt"
#: train.precision -> the dtype FSDP2 gathers parameters in for the forward and backward
PARAM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: the max gradient norm when train.grad_clip is None: DeepSpeed's default (its
#: GRADIENT_CLIPPING_DEFAULT), so that one config clips alike on either engine
DEFAULT_GRAD_CLIP = 1.0


def precision_of(cfg: Config) -> str:
    """train.precision; "auto": what distributed.ds_config enables, as on the DeepSpeed
    engine (config.py's meaning of "auto"), so that one config trains in one precision on
    either engine. The JSON's DeepSpeed-only settings, which this engine cannot honour, are
    refused by name (:func:`refuse_deepspeed_only_settings`)."""
    ds = refuse_deepspeed_only_settings(cfg)
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    if p not in PARAM_DTYPES:
        raise ConfigError(f"config key 'train.precision': the fsdp2 engine runs bf16 or fp32, got {p!r} "
                          f"(fp16 needs a loss scaler: use distributed.engine=deepspeed)")
    return p


def refuse_deepspeed_only_settings(cfg: Config) -> dict:
    """The DeepSpeed JSON (read for its precision), after refusing what only DeepSpeed
    does: a ZeRO stage asked for by distributed.zero_stage, and CPU/NVMe offload (FSDP2
    here shards every parameter, gradient and optimizer state over the ranks, in memory)."""
    import json

    from ...presets import ds_config_path
    if cfg.distributed.zero_stage is not None:
        raise ConfigError(f"config key 'distributed.zero_stage': {cfg.distributed.zero_stage} is a DeepSpeed setting; "
                          f"the fsdp2 engine shards everything (unset it, or use distributed.engine=deepspeed)")
    path = ds_config_path(cfg.distributed.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            raise ConfigError(f"config key 'distributed.ds_config': {path} asks for {key}, which the fsdp2 "
                              f"engine does not do (choose a JSON without it, or distributed.engine=deepspeed)")
    return ds


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules each sharded on their own (gathered one at a time in the forward): the
    ViT blocks and BERT text layers of the online and momentum encoders, and of each fusion
    layer its self-attention and MLP. A unit's parameters are gathered only around its own
    forward: the fusion layers' cross-attention is also called outside it (``cross_kv``
    computes every layer's image keys and values first), so it stays with the root, whose
    parameters are whole for the whole forward and backward."""
    out = []
    for module in model.children():
        if hasattr(module, "blocks"):  # ImageEncoder
            out += list(module.blocks)
        bert = getattr(module, "bert", None)
        if bert is not None and hasattr(bert, "encoder"):
            for layer in bert.encoder.layer:
                if getattr(layer, "has_cross_attention", False):
                    out += [layer.attention, layer.intermediate, layer.output]
                else:
                    out.append(layer)
    return out


class FSDP2Engine:
    """``model`` sharded by FSDP2 over every rank, with our optimizer and schedule.
    ``load_universal`` is accepted and unused: DCP reads any world size's checkpoint."""

    name = "fsdp2"

    def __init__(self, model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int,
                 load_universal: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.precision = precision_of(cfg)
        self.dtype = PARAM_DTYPES[self.precision]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model.to(device)
        mesh = init_device_mesh(device.type, (world_size,)) if dist.is_initialized() else None
        if mesh is None:
            raise RuntimeError("the fsdp2 engine needs a process group (albef_ds.distributed.init_distributed)")
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in blocks_of(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.module = model
        self.world = world_size
        t = cfg.train
        groups = param_groups(model, t.weight_decay, t.lr, t.itm_lr_scale)
        self.group_settings = [(g.get("lr", t.lr), g["weight_decay"]) for g in groups]
        # torch's AdamW as DeepSpeed builds it on a CPU (foreach); fused on CUDA
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=1e-8,
                                           fused=fused, foreach=not fused)
        self.optimizer_name = f"torch.AdamW({'fused' if fused else 'foreach'})"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps))
        self.accum = t.grad_accum_steps
        self.clip = DEFAULT_GRAD_CLIP if t.grad_clip is None else t.grad_clip
        self.micro = 0
        self._grad_norm = 0.0

    # ------------------------------------------------------------------ the step
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """The loss of one micro-step, divided by the accumulation count (as DeepSpeed's
        backward does): the gradients of a step are the mean over its micro-steps."""
        (loss / self.accum if self.accum > 1 else loss).backward()

    def step(self) -> bool:
        """An optimizer step (after clipping) at an accumulation boundary; returns whether
        it was one."""
        self.micro += 1
        if self.micro < self.accum:
            return False
        self.micro = 0
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf)
        self._grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def train(self) -> None:
        self.module.train()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> float:
        """The norm of the last step's gradients, before clipping."""
        return self._grad_norm

    # ------------------------------------------------------------------ values outside the forward
    @torch.no_grad()
    def scalar(self, param: torch.nn.Parameter) -> float:
        """A one-element parameter's value: gathered (a collective: every rank calls it)."""
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        return float(value.detach().float().reshape(-1)[0])

    @contextlib.contextmanager
    def gathered_parameters(self):
        """Every sharded unit's parameters whole on this rank (an evaluation's forwards),
        and kept whole until the end: the forwards inside run no collective of FSDP's, so
        ranks may run different numbers of them (an evaluation splits its images unevenly)."""
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                # as fully_shard left them: the root keeps its parameters from the forward to the
                # backward, every other unit reshards after its forward
                m.set_reshard_after_forward(m is not self.module, recurse=False)

    @torch.no_grad()
    def clamp_master(self, param: torch.nn.Parameter, low: float, high: float) -> None:
        """The optimizer's master is the local fp32 shard: each rank clamps its rows."""
        local_of(param).clamp_(low, high)

    def meta(self) -> dict:
        return {"precision": self.precision}

    def describe(self) -> str:
        return f"engine fsdp2 (per block + root); precision {self.precision}, fp32 gradient reduction; " \
               f"optimizer {self.optimizer_name}"

    # ------------------------------------------------------------------ the EMA's views
    @staticmethod
    def is_partitioned(p: torch.nn.Parameter) -> bool:
        return hasattr(p, "to_local")

    @staticmethod
    def local_partition(p: torch.nn.Parameter) -> torch.Tensor | None:
        return local_of(p) if hasattr(p, "to_local") else None

    @staticmethod
    def partition_slice(p, flat_full: torch.Tensor, dp_rank: int) -> tuple[torch.Tensor, int]:
        """Rows ``[r * ceil(n / world), ...)`` of the whole tensor, flattened: the elements
        rank ``dp_rank`` holds, and where they start."""
        rows = p.shape[0] if len(p.shape) else 1
        per_rank = -(-rows // p.device_mesh.size())
        row_size = math.prod(p.shape[1:])
        start = min(dp_rank * per_rank, rows) * row_size
        end = min((dp_rank + 1) * per_rank, rows) * row_size
        return flat_full[start:end], start

    # a DTensor's shape is the whole tensor's, as a plain tensor's is
    full_shape = staticmethod(WholeTensorViews.full_shape)
    full_numel = staticmethod(WholeTensorViews.full_numel)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        buffers = {name for name, _ in self.module.named_buffers()}
        # (buffers: the queues, which the Trainer saves per negatives pool, and constants)
        model = {k: v for k, v in get_model_state_dict(self.module).items() if k not in buffers}
        return {"model": model, "optim": get_optimizer_state_dict(self.module, self.optimizer)}

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict) -> None:
        """Every rank writes its own shards (``__<rank>_0.distcp``) into ``directory/tag``;
        rank 0 the DCP metadata and the client state with the schedule."""
        import torch.distributed.checkpoint as dcp
        out = Path(directory) / tag
        out.mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=str(out))
        if dist.get_rank() == 0:
            torch.save({"client_state": client_state, "scheduler": self.scheduler.state_dict()}, out / CLIENT_FILE)
        dist.barrier()

    def load_checkpoint(self, tag_dir: Path) -> dict | None:
        """The shards of ``tag_dir`` resharded onto this world (any size); the client state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        if not (Path(tag_dir) / CLIENT_FILE).is_file():
            return None
        state = self._state()
        dcp.load(state, checkpoint_id=str(tag_dir))
        set_model_state_dict(self.module, state["model"],
                             options=_options(strict=False))  # (buffers are the Trainer's)
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
        saved = torch.load(Path(tag_dir) / CLIENT_FILE, weights_only=False)
        self.scheduler.load_state_dict(saved["scheduler"])
        return saved["client_state"]

    def apply_settings(self, cfg: Config, total_steps: int) -> None:
        """This config's optimizer settings and schedule over the loaded ones (as the
        DeepSpeed engine does: albef_ds.train.resume_settings)."""
        t = cfg.train
        schedule = lr_lambda(total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps)
        groups = self.optimizer.param_groups
        if len(groups) != len(self.group_settings):
            raise ConfigError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this config "
                              f"{len(self.group_settings)} (train.itm_lr_scale?)")
        self.scheduler.lr_lambdas = [schedule] * len(groups)
        for i, (group, (base, decay)) in enumerate(zip(groups, self.group_settings)):
            group.update(weight_decay=decay, betas=tuple(t.betas), initial_lr=base)
            self.scheduler.base_lrs[i] = base
            group["lr"] = base * schedule(self.scheduler.last_epoch)

    # ------------------------------------------------------------------ without an engine
    @staticmethod
    def record(cfg: Config, world_size: int) -> dict:
        return {"precision": precision_of(cfg)}

    record_reason = "train.precision: the optimizer state was kept for the precision that wrote it"
    #: DCP reads a checkpoint on any world size: nothing to convert
    convert_for_world = None

    @staticmethod
    def consolidated_fp32_state(tag_dir: Path) -> dict:
        """The online (and momentum) weights of a DCP checkpoint, whole, in fp32, read in
        one process (no process group)."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "full.pt"
            dcp_to_torch_save(str(tag_dir), str(path))
            full = torch.load(path, weights_only=False)
        return {k: v.float() for k, v in full["model"].items() if torch.is_tensor(v)}

    @staticmethod
    def release_local(launch) -> None:
        """FSDP2 leaves nothing on the host."""


def local_of(p: torch.nn.Parameter) -> torch.Tensor:
    """The local shard's storage of a DTensor parameter (writes reach the shard)."""
    return p._local_tensor if hasattr(p, "_local_tensor") else p.data


def _options(strict: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(strict=strict)

