"""The momentum (EMA) encoder: an fp32 master, right under every engine and ZeRO stage.

DeepSpeed casts every module parameter to bf16/fp16, the frozen momentum copy included;
with m = 0.995 a bf16 EMA stops moving (the update rounds to zero), so the EMA runs on an
fp32 master and the result is copied into the parameters the forward reads.

Where each parameter's values live is the engine's answer (its EMA views:
albef_ds/train/engines/base.py); a model no engine wraps holds every parameter whole.

Under ZeRO-3 each rank holds a partition of every parameter in ``param.ds_tensor``; the
EMA of a partition needs only the same partition of the online parameter, so no full
weight is ever gathered. Parameters under ``stage3_param_persistence_threshold`` are kept
whole on every rank (``ds_persist``) and the forward reads ``param.data``, not
``ds_tensor``: those are updated whole (and their partition too, so the two agree).
"""
from __future__ import annotations

import math

import torch

from .engines.base import WholeTensorViews


class MomentumEMA:
    """``dp_rank``: this rank's data-parallel rank (which partition it holds); ``views``: the
    engine's views of its parameters (default: every parameter whole)."""

    def __init__(self, model, momentum: float, dp_rank: int = 0, foreach: bool = True, views=None):
        self.momentum = momentum
        self.dp_rank = dp_rank
        self.foreach = foreach
        self.views = views = views if views is not None else WholeTensorViews()
        self.names, self.pairs, self.kinds, self.shapes, self.offsets = [], [], [], [], []
        for name, p, p_m in model.momentum_named_params():
            partitioned = views.is_partitioned(p_m)
            self.names.append(name)
            self.pairs.append((p, p_m))
            self.kinds.append("partition" if partitioned else "full")
            self.shapes.append(views.full_shape(p_m))
            self.offsets.append(views.partition_slice(p_m, torch.empty(0), dp_rank)[1] if partitioned else 0)
        # Under ZeRO-3, persistent parameters are only materialised whole by the first
        # forward, so the master is taken at the first update (or from a checkpoint).
        self.master: list | None = None

    def _init_master(self, dst: list) -> None:
        src, _ = self._storages()
        for name, s, d, kind in zip(self.names, src, dst, self.kinds):
            # (a partition may be empty: FSDP2 gives the last ranks no rows of a tensor with few)
            if s.numel() != d.numel() or (d.numel() == 0 and kind == "full"):
                raise RuntimeError(f"EMA of {name}: online storage has {s.numel()} elements, "
                                   f"momentum storage {d.numel()}")
        # fp32 at least (a bf16 EMA rounds m = 0.995 updates away); a float64 model keeps float64
        self.master = [d.detach().to(torch.promote_types(d.dtype, torch.float32)).clone() for d in dst]

    def _storages(self) -> tuple[list, list]:
        """Where each pair's values live now (DeepSpeed may move ``.data`` between steps)."""
        v = self.views
        src, dst = [], []
        for (p, p_m), kind in zip(self.pairs, self.kinds):
            if kind == "partition":
                dst.append(v.local_partition(p_m))
                src.append(v.local_partition(p) if v.is_partitioned(p) else
                           v.partition_slice(p, p.data.view(-1), self.dp_rank)[0])
            else:
                dst.append(p_m.data)
                src.append(p.data)
        return src, dst

    @torch.no_grad()
    def update(self) -> None:
        """master <- m * master + (1 - m) * online; then write the master into the weights."""
        m = self.momentum
        src, dst = self._storages()
        if self.master is None:
            self._init_master(dst)
        src = [s.reshape(d.shape).to(m_.dtype) for s, d, m_ in zip(src, dst, self.master)]
        if self.foreach:
            torch._foreach_mul_(self.master, m)
            torch._foreach_add_(self.master, src, alpha=1 - m)
        else:
            for master, s in zip(self.master, src):
                master.mul_(m).add_(s, alpha=1 - m)
        self._write(dst)

    @torch.no_grad()
    def _write(self, dst: list | None = None) -> None:
        dst = self._storages()[1] if dst is None else dst
        for d, master in zip(dst, self.master):
            d.copy_(master.view_as(d))
        # Persistent ZeRO-3 parameters are read whole, but keep their partition in step too.
        for (_, p_m), kind, master in zip(self.pairs, self.kinds, self.master):
            if kind == "full" and self.views.local_partition(p_m) is not None:
                piece, _ = self.views.partition_slice(p_m, master.view(-1), self.dp_rank)
                self.views.local_partition(p_m)[: piece.numel()].copy_(piece)

    def _ensure_master(self) -> None:
        if self.master is None:
            self._init_master(self._storages()[1])

    def full_state(self) -> dict:
        """Name -> fp32 master of every parameter held whole (all of them under ZeRO-0/1/2,
        the persistent ones under ZeRO-3): the same on every rank, so one rank saves it."""
        self._ensure_master()
        return {"shapes": dict(zip(self.names, self.shapes)),
                "full": {n: m.reshape(shape).clone() for n, m, k, shape in
                         zip(self.names, self.master, self.kinds, self.shapes) if k == "full"}}

    def layout(self) -> dict:
        """Name -> [whole elements, elements per partition] of every ZeRO-3-partitioned
        master (rank r holds [r x per partition, (r + 1) x per partition)): for the record."""
        self._ensure_master()
        return {n: [math.prod(shape), m.numel()] for n, m, k, shape in
                zip(self.names, self.master, self.kinds, self.shapes) if k == "partition"}

    def partition_state(self) -> dict:
        """This rank's ZeRO-3 partitions of the master: name -> (offset, flat tensor)."""
        self._ensure_master()
        return {n: (off, m.reshape(-1).clone()) for n, m, k, off in
                zip(self.names, self.master, self.kinds, self.offsets) if k == "partition"}

    def _zero_master(self) -> None:
        """An fp32 master shaped like the momentum storages, to be filled from a checkpoint."""
        if self.master is None:
            self.master = [torch.zeros(d.shape, dtype=torch.promote_types(d.dtype, torch.float32))
                           for d in self._storages()[1]]

    def load(self, full_state: dict, partitions: dict) -> None:
        """Same world size: the shared whole tensors and this rank's own partitions."""
        self._zero_master()
        for i, name in enumerate(self.names):
            if self.kinds[i] == "full":
                source = full_state["full"].get(name)
            else:
                source = partitions.get(name, (None, None))[1]
                if source is not None and partitions[name][0] != self.offsets[i]:
                    source = None
            if source is None or source.numel() != self.master[i].numel():
                raise RuntimeError(f"momentum master in the checkpoint does not match this model/partitioning "
                                   f"at {name}")
            self.master[i].copy_(source.reshape(self.master[i].shape))
        self._write()

    def load_full(self, full: dict) -> None:
        """Fill the master from full fp32 momentum tensors (name -> tensor), e.g. after a
        resume on another number of ranks."""
        self._zero_master()
        for i, name in enumerate(self.names):
            flat = full[name].to(self.master[i].dtype).reshape(-1)
            if self.kinds[i] == "partition":
                piece = flat[self.offsets[i]: self.offsets[i] + self.master[i].numel()]
                self.master[i].zero_()
                self.master[i].view(-1)[: piece.numel()].copy_(piece)
            else:
                self.master[i].copy_(flat.view_as(self.master[i]))
        self._write()


def assemble_full(full_state: dict, partition_states) -> dict:
    """Full fp32 momentum tensors from the shared whole tensors and every rank's ZeRO-3
    partitions; ``partition_states`` is iterated once, in rank order (pass a generator that
    loads one rank's file at a time: one full copy in memory, never every rank's files at
    once). Assembled only when complete: every element of every partitioned tensor comes
    from exactly one rank's partition, or a CheckpointError names the tensor and the rank
    file that should have held the missing part (nothing is zero-filled)."""
    from .checkpoint import CheckpointError, rank_file_name
    shapes = full_state["shapes"]
    out = {n: t.clone() for n, t in full_state["full"].items()}
    flats = {n: torch.zeros(math.prod(shape)) for n, shape in shapes.items() if n not in out}
    spans: dict[str, list] = {n: [] for n in flats}
    for rank, partitions in enumerate(partition_states):
        for name, (offset, part) in partitions.items():
            if name not in flats:
                raise CheckpointError(f"{rank_file_name(rank)} holds a partition of {name}, which the momentum "
                                      f"file holds whole or does not know: files of different checkpoints?")
            flat = flats[name]
            n = max(0, min(part.numel(), flat.numel() - offset))  # the last partition is padded
            flat[offset: offset + n] = part[:n]
            spans[name].append((offset, offset + n, part.numel(), rank))
    for name, flat in flats.items():
        _check_coverage(name, sorted(spans[name]), flat.numel())
        out[name] = flat.reshape(shapes[name])
    return out


def _check_coverage(name: str, spans: list, numel: int) -> None:
    """Spans (start, end, partition size, rank) must tile [0, numel) without gap or overlap."""
    from .checkpoint import CheckpointError, rank_file_name
    size = spans[0][2] if spans else None
    pos = 0
    for start, end, _, rank in spans:
        if start > pos:
            break
        if start < pos and end > start:
            raise CheckpointError(f"momentum master of {name}: elements {start}..{min(pos, end)} are in two rank "
                                  f"files ({rank_file_name(rank)} and an earlier one): files of different "
                                  f"checkpoints?")
        pos = max(pos, end)
    if pos < numel:
        owner = rank_file_name(pos // size) if size else "any rank file"
        raise CheckpointError(f"momentum master of {name}: elements {pos}.. of {numel} are in no rank file "
                              f"({owner} should hold them); nothing was loaded")
