"""A scaling model of ALBEF pretraining: bytes each step moves per rank, and the step time
and efficiency that follow on a stated network.

    albef-ds bench --config configs/albef-base.yaml --scaling [--scaling-batch 64]

Weak scaling: every GPU keeps its micro-batch ``b``; the global batch is ``N * b``.
What one optimizer step moves per rank (``world_size`` = N; ``s`` = bytes per element of
the compute dtype, 2 for bf16; ring collectives, so a rank sends and receives
``(N - 1) / N`` of the gathered or reduced buffer):

- momentum-feature gathers (no gradient) over the negatives pool of ``P`` ranks
  (``model.negative_pool``; P = N by default): image and text features ``[b, embed_dim]``
  each, all-gathered every step (the queue and the pool's ITC candidates);
- image ids ``[b]`` int64 (ITC id positives / same-image exclusion);
- pooled ITM negatives (``itm_negatives=pool``), ``itm_exchange=rows`` (implemented, the
  default): each rank receives the ``b`` image-embedding rows ``[tokens, width]`` it drew,
  ``(P - 1) / P`` of them from other ranks under uniform draws, and sends as many gradient
  rows back: constant in P. ``itm_exchange=gather``: every rank's embeddings all-gathered
  WITH gradient (forward all-gather, backward reduce-scatter of the same size): O(P).
  Negative texts move as ids and mask ``[b, L]`` int64 rows, and are re-encoded, which
  costs a text-encoder forward + backward over ``b`` more rows;
- ZeRO-1/2: gradients reduce-scattered and updated parameters all-gathered, both in the
  compute dtype (the bytes of an all-reduce); ZeRO-3 instead all-gathers the parameters in
  the forward and again in the backward (plus the momentum parameters in the momentum
  forward) and reduce-scatters the gradients: one extra pass over the trainable parameters
  and one over the momentum ones.

Time of a collective over a buffer of S bytes (the gathered / reduced size): bandwidth
term ``(N-1)/N * S / bw`` (twice for an all-reduce) plus a latency term
``2 * log2(N) * alpha`` (tree-like start-up). ``bw`` is the per-GPU NVLink bandwidth while
the job fits one node, the per-GPU InfiniBand bandwidth beyond (the slowest link of a ring
that crosses nodes). Compute: the analytic FLOPs per pair (albef_ds.model_info, ITC over
the global batch + queue) at an assumed MFU of the device's dense bf16 peak, plus the
re-encoding of negative texts. The feature and embedding gathers block (their results are
needed at once); ZeRO traffic overlaps the backward up to ``overlap`` of its time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .config import Config

INT64 = 8


@dataclass
class Network:
    """A cluster of 8-GPU nodes. Defaults: H100 SXM nodes, NVLink 4 (450 GB/s per GPU and
    direction), one 400 Gb/s InfiniBand NIC per GPU (50 GB/s)."""
    name: str = "8x H100 SXM per node, NVLink 450 GB/s per GPU, 400 Gb/s InfiniBand per GPU"
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0
    ib_gbs: float = 50.0
    #: per-step start-up of a collective (seconds)
    latency_s: float = 10e-6
    #: dense bf16 peak FLOP/s of one GPU (H100 SXM)
    peak_flops: float = 989.4e12
    #: assumed model FLOPs utilisation of the compute
    mfu: float = 0.45
    #: fraction of the backward that ZeRO's gradient/parameter traffic can hide behind
    overlap: float = 0.8

    def bandwidth(self, world: int) -> float:
        return (self.nvlink_gbs if world <= self.gpus_per_node else self.ib_gbs) * 1e9


def comm_bytes(cfg: Config, world: int, batch: int, text_len: int, params: int,
               momentum_params: int, zero_stage: int = 2, dtype_bytes: int = 2,
               selected_only: Optional[bool] = None) -> dict:
    """Bytes per rank per optimizer step: the size of each gathered / reduced buffer
    (``*_buffer``) and what one rank sends (= receives) over a ring (``*_sent``).
    ``params``/``momentum_params``: element counts (trainable, momentum copies).
    ``selected_only``: the row exchange (default: ``model.itm_exchange == "rows"``); the
    embedding buffer is then the ``b`` rows one rank receives."""
    m = cfg.model
    if selected_only is None:
        selected_only = m.itm_exchange == "rows"
    n_img = (m.image_res // m.patch_size) ** 2 + 1
    pool = cfg.pool_size(world)
    ring = (world - 1) / world if world > 1 else 0.0
    pool_ring = (pool - 1) / pool if pool > 1 else 0.0
    out: dict[str, float] = {"pool": pool}
    # buffers: the full gathered tensor over the pool's ranks
    out["feature_gather_buffer"] = 2 * pool * batch * m.embed_dim * dtype_bytes
    out["image_id_gather_buffer"] = pool * batch * INT64
    if m.itm_negatives == "pool" and pool > 1:
        rows = batch if selected_only else pool * batch
        out["image_embed_gather_buffer"] = rows * n_img * m.vision_width * dtype_bytes
        out["text_id_gather_buffer"] = 2 * rows * text_len * INT64  # ids and mask
    else:
        out["image_embed_gather_buffer"] = 0
        out["text_id_gather_buffer"] = 0
    grad = params * dtype_bytes
    if zero_stage in (1, 2):
        zero = 2 * grad  # reduce-scatter of gradients + all-gather of updated parameters
        zero3_extra = 0
    elif zero_stage == 3:
        zero = 3 * grad + momentum_params * dtype_bytes
        zero3_extra = grad + momentum_params * dtype_bytes
    else:  # stage 0: an all-reduce of the gradients
        zero = 2 * grad
        zero3_extra = 0
    out["zero_buffer"] = zero
    out["zero3_extra_buffer"] = zero3_extra
    # per-rank traffic within the pool (a ring gather, or the rows other ranks own); the
    # embeddings move once forward, once backward
    out["feature_gather_sent"] = pool_ring * out["feature_gather_buffer"]
    out["image_id_gather_sent"] = pool_ring * out["image_id_gather_buffer"]
    out["image_embed_gather_sent"] = pool_ring * 2 * out["image_embed_gather_buffer"]
    out["text_id_gather_sent"] = pool_ring * out["text_id_gather_buffer"]
    out["zero_sent"] = ring * zero
    out["blocking_sent"] = (out["feature_gather_sent"] + out["image_id_gather_sent"]
                            + out["image_embed_gather_sent"] + out["text_id_gather_sent"])
    out["total_sent"] = out["blocking_sent"] + out["zero_sent"]
    return out


def _collectives(cfg: Config, zero_stage: int) -> tuple[int, int]:
    """(blocking collectives per step, ZeRO collectives per step), for the latency term."""
    blocking = 3 + (4 if cfg.model.itm_negatives == "pool" else 0)
    return blocking, (3 if zero_stage == 3 else 2)


def predict(cfg: Config, world: int, batch: int, text_len: int, params: int, momentum_params: int,
            net: Network, zero_stage: int = 2, selected_only: bool = False) -> dict:
    """Step time and weak-scaling efficiency at ``world`` GPUs."""
    from .model_info import analytic_flops, analytic_flops_table

    pool = cfg.pool_size(world)
    cands = pool * batch if cfg.model.itc_candidates == "pool" else batch
    flops = analytic_flops(cfg, text_len, cands)["total"]
    extra = 0.0
    if cfg.model.itm_negatives == "pool" and pool > 1:
        t = analytic_flops_table(cfg, text_len, cands)["text_encoder"]
        extra = t["fwd"] + t["bwd"]  # negative texts re-encoded with gradient
    rate = net.peak_flops * net.mfu
    compute = batch * flops / rate
    extra_s = batch * extra / rate
    backward = compute * (2 / 3)
    b = comm_bytes(cfg, world, batch, text_len, params, momentum_params, zero_stage,
                   selected_only=selected_only)
    bw = net.bandwidth(world)
    n_block, n_zero = _collectives(cfg, zero_stage)
    lat = 2 * math.log2(world) * net.latency_s if world > 1 else 0.0
    # The pool's gathers and exchange stay inside a node while the pool fits one (its ranks
    # are consecutive); ZeRO's traffic spans the world.
    blocking_s = b["blocking_sent"] / net.bandwidth(pool) + n_block * lat
    zero_s = b["zero_sent"] / bw + n_zero * lat if world > 1 else 0.0
    exposed_zero = max(0.0, zero_s - net.overlap * backward)
    step = compute + extra_s + blocking_s + exposed_zero
    single = batch * analytic_flops(cfg, text_len, batch)["total"] / rate
    return {"world": world, "batch": batch, "global_batch": world * batch,
            "compute_s": compute, "extra_compute_s": extra_s, "blocking_comm_s": blocking_s,
            "zero_comm_s": zero_s, "exposed_zero_s": exposed_zero, "step_s": step,
            "pairs_per_s_per_gpu": batch / step, "efficiency": single / step,
            "mfu": batch * flops / step / net.peak_flops, "bytes": b}


def report(cfg: Config, batch: Optional[int] = None, text_len: Optional[int] = None,
           worlds=(1, 8, 64, 512), zero_stages=(2, 3), net: Optional[Network] = None) -> dict:
    from .model_info import build_meta_model, count_params

    net = net or Network()
    batch = batch or cfg.train.micro_batch_size
    text_len = text_len or cfg.data.max_tokens
    counts = count_params(build_meta_model(cfg.model))
    rows = []
    variants = [(f"pool {cfg.model.negative_pool}, {cfg.model.itm_negatives}", cfg, None)]
    if cfg.model.itm_negatives == "pool":
        world_pool = _with(cfg, negative_pool="world")
        variants += [("pool world, rows", _with(world_pool, itm_exchange="rows"), True),
                     ("pool world, full gather", _with(world_pool, itm_exchange="gather"), False),
                     ("itm_negatives=local", _with(cfg, itm_negatives="local"), False)]
    for variant, c, selected in variants:
        for z in zero_stages:
            for w in worlds:
                r = predict(c, w, batch, text_len, counts["trainable"], counts["momentum"], net, z,
                            selected_only=selected)
                r.update({"variant": variant, "zero_stage": z})
                rows.append(r)
    return {"network": dataclasses.asdict(net), "batch": batch, "text_len": text_len,
            "trainable_params": counts["trainable"], "momentum_params": counts["momentum"],
            "rows": rows}


def _with(cfg: Config, **model) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def format_report(out: dict) -> str:
    net = out["network"]
    lines = [f"Scaling model: {net['name']}; compute at {100 * net['mfu']:.0f}% MFU of "
             f"{net['peak_flops'] / 1e12:.0f} TFLOP/s; {out['batch']} pairs/GPU, {out['text_len']} tokens; "
             f"{out['trainable_params'] / 1e6:.1f}M trainable + {out['momentum_params'] / 1e6:.1f}M momentum params",
             f"  {'variant':26s}{'ZeRO':>5s}{'GPUs':>6s}{'feat MB':>9s}{'emb MB':>9s}{'ZeRO MB':>9s}"
             f"{'compute':>9s}{'block':>8s}{'ZeRO':>8s}{'step ms':>9s}{'pairs/s/GPU':>12s}{'eff.':>7s}"]
    for r in out["rows"]:
        b = r["bytes"]
        lines.append(
            f"  {r['variant']:26s}{r['zero_stage']:5d}{r['world']:6d}"
            f"{(b['feature_gather_sent'] + b['image_id_gather_sent']) / 1e6:9.2f}"
            f"{(b['image_embed_gather_sent'] + b['text_id_gather_sent']) / 1e6:9.1f}"
            f"{b['zero_sent'] / 1e6:9.1f}{1000 * (r['compute_s'] + r['extra_compute_s']):9.1f}"
            f"{1000 * r['blocking_comm_s']:8.1f}{1000 * r['zero_comm_s']:8.1f}{1000 * r['step_s']:9.1f}"
            f"{r['pairs_per_s_per_gpu']:12.0f}{100 * r['efficiency']:6.0f}%")
    lines.append("  (rows: each rank receives only the negative image embeddings it drew; full gather: every "
                 "rank's, the O(pool) option)")
    lines.append("  (MB sent per rank per step; block = feature/embedding gathers on the critical path; "
                 "ZeRO traffic hidden behind the backward up to "
                 f"{100 * net['overlap']:.0f}% of it)")
    return "\n".join(lines)
