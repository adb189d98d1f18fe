"""The seam every training engine stands behind, and the registry that picks one.

The Trainer, the EMA, checkpoints and export talk to an engine only through the methods of
:class:`Engine`; only an engine's own file imports its library (tests/test_imports.py
checks). Adding an engine is one file beside this one plus its line in :data:`ENGINES`.

What an engine is asked for, and why each call is here:

- set-up: ``Engine(model, cfg, world_size, total_steps, load_other_world)`` wraps the model
  and builds the optimizer (:func:`.optim.param_groups`) and the schedule;
- the step: ``forward`` / ``backward`` / ``step`` (True when the optimizer stepped; the loss
  of a micro-step is divided by the accumulation count inside the engine, as DeepSpeed's
  ``engine.backward`` does), ``lr``, ``grad_norm``, ``train``;
- values outside the forward: ``scalar`` (a one-element parameter), ``gathered_parameters``
  (a context in which every weight is whole, for evaluation), ``clamp_master`` (clamp a
  parameter where the optimizer keeps its master copy);
- the EMA's views (:class:`WholeTensorViews` is the plain-model answer): which parameters
  are held as a local piece only, that piece's storage, the piece's place in the flattened
  whole, the whole shape and element count;
- checkpoints: ``save_checkpoint`` / ``load_checkpoint`` / ``apply_settings``; the class
  methods ``record`` (what a checkpoint must match to be loadable: stage, precision),
  ``convert_for_world`` (None when another world size loads without a conversion) and
  ``consolidated_fp32_state`` (export);
- ``describe()``: the one-line description the run log prints; ``release_local``: what a
  rank leaves behind on the host (shared memory), removed on the way out.
"""
from __future__ import annotations

import importlib
import math
from typing import Protocol

import torch

#: engine name (the config key ``distributed.engine``) -> "module:class" (imported on use,
#: so a run imports only its own engine's library)
ENGINES = {
    "deepspeed": "albef_ds.train.engines.deepspeed:DeepSpeedEngine",
    "fsdp2": "albef_ds.train.engines.fsdp2:FSDP2Engine",
}


def engine_class(name: str):
    """The engine class registered as ``name``; a ConfigError naming the key and the choices."""
    from ...config import ConfigError
    if name not in ENGINES:
        raise ConfigError(f"config key 'distributed.engine': unknown engine {name!r}; "
                          f"choose one of {', '.join(sorted(ENGINES))}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


class Engine(Protocol):
    name: str
    module: torch.nn.Module
    dtype: torch.dtype
    precision: str
    optimizer_name: str

    def forward(self, *args, **kwargs): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> bool: ...
    def train(self) -> None: ...
    def lr(self) -> float: ...
    def grad_norm(self) -> float: ...
    def scalar(self, param: torch.nn.Parameter) -> float: ...
    def gathered_parameters(self): ...
    def clamp_master(self, param: torch.nn.Parameter, low: float, high: float) -> None: ...
    # the EMA's views
    def is_partitioned(self, p: torch.nn.Parameter) -> bool: ...
    def local_partition(self, p: torch.nn.Parameter) -> torch.Tensor | None: ...
    def partition_slice(self, p, flat_full: torch.Tensor, dp_rank: int) -> tuple[torch.Tensor, int]: ...
    def full_shape(self, p: torch.nn.Parameter) -> tuple: ...
    def full_numel(self, p: torch.nn.Parameter) -> int: ...
    # checkpoints
    def save_checkpoint(self, directory, tag: str, client_state: dict) -> None: ...
    def load_checkpoint(self, tag_dir) -> dict | None: ...
    def apply_settings(self, cfg, total_steps: int) -> None: ...
    def meta(self) -> dict: ...
    def describe(self) -> str: ...


class WholeTensorViews:
    """The EMA's views of a model no engine partitions: every parameter whole, here."""

    @staticmethod
    def is_partitioned(p: torch.nn.Parameter) -> bool:
        return False

    @staticmethod
    def local_partition(p: torch.nn.Parameter) -> torch.Tensor | None:
        return None

    @staticmethod
    def partition_slice(p, flat_full: torch.Tensor, dp_rank: int) -> tuple[torch.Tensor, int]:
        return flat_full, 0

    @staticmethod
    def full_shape(p: torch.nn.Parameter) -> tuple:
        return tuple(p.shape)

    @staticmethod
    def full_numel(p: torch.nn.Parameter) -> int:
        return math.prod(p.shape)
