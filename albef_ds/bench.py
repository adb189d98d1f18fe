"""``albef-ds bench``: time the real training step on synthetic inputs.

    albef-ds bench --config tiny                         # the fast path, phases, pairs/s
    albef-ds bench --config tiny --options reference     # what the reference computes, its way
    albef-ds bench --config tiny --compare reference fast --steps 20

An option set is a preset name (``fast``, ``reference``) or comma-separated switches
``key=value``: config keys (``model.sdpa=false``) and bench keys (``autocast=bf16``,
``compile=true``, ``queue_broadcast=true``, ``fused_adam=true``). ``--compare A B`` builds
both models and alternates their steps in one process, so machine noise hits both alike,
and prints B's speed-up over A.

FLOPs per pair are the analytic count of the reference algorithm (albef_ds.model_info):
the project's single MFU definition. On a CPU the report gives achieved GFLOP/s instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from . import losses
from .config import Config, load_config

#: Switches of the reference ALBEF implementation (fp32, eager attention, a Python loop of
#: multinomial draws, full-vocabulary MLM head, per-parameter EMA, fusion K/V recomputed
#: per pass, queues broadcast every step as DDP does with buffers).
PRESETS = {
    "reference": "model.sdpa=false,model.share_cross_kv=false,model.mlm_masked_only=false,"
                 "model.itm_vectorized_sampling=false,model.foreach_ema=false,autocast=none,"
                 "queue_broadcast=true,fused_adam=false",
    "fast": "model.sdpa=true,model.share_cross_kv=true,model.mlm_masked_only=true,"
            "model.itm_vectorized_sampling=true,model.foreach_ema=true,fused_adam=true",
}
BENCH_KEYS = {"autocast": "none", "compile": "false", "queue_broadcast": "false", "fused_adam": "true"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config or preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--options", default="fast", help="option set: fast, reference, or key=value,...")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two option sets, interleaved")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default: train.micro_batch_size)")
    p.add_argument("--text-len", type=int, default=None, help="tokens per caption (default: data.max_tokens)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def parse_options(spec: str) -> tuple[list[str], dict]:
    """'fast' / 'reference' / 'k=v,k=v' -> (config overrides, bench switches)."""
    spec = PRESETS.get(spec, spec)
    overrides, bench = [], dict(BENCH_KEYS)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key in PRESETS:
            sub_o, sub_b = parse_options(key)
            overrides += sub_o
            bench.update({k: v for k, v in sub_b.items() if k in PRESETS[key]})
        elif key in BENCH_KEYS:
            bench[key] = value
        elif "." in key:
            overrides.append(item)
        else:
            raise SystemExit(f"--options: unknown switch '{key}' (config keys look like model.sdpa; "
                             f"bench keys: {', '.join(BENCH_KEYS)})")
    return overrides, bench


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t = time.perf_counter()
        yield
        self.sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t


class Runner:
    """One option set: a model, its optimizer, and a fixed synthetic batch."""

    def __init__(self, cfg: Config, bench: dict, batch: int, text_len: int, device: torch.device):
        from .models import ALBEF
        self.cfg, self.bench, self.device = cfg, bench, device
        torch.manual_seed(cfg.train.seed)
        self.model = ALBEF(cfg.model).to(device)
        self.model.train()
        fused = bench["fused_adam"] == "true"
        self.optimizer = make_optimizer(self.model, cfg, device, fused)
        self.autocast = bench["autocast"]
        if bench["compile"] == "true":
            self.model.visual_encoder = torch.compile(self.model.visual_encoder)
            self.model.text_encoder.bert = torch.compile(self.model.text_encoder.bert)
        g = torch.Generator().manual_seed(0)
        res, vocab = cfg.model.image_res, cfg.model.vocab_size
        self.images = torch.randn(batch, 3, res, res, generator=g).to(device)
        self.ids = torch.randint(5, vocab, (batch, text_len), generator=g).to(device)
        self.ids[:, 0] = 2
        self.mask = torch.ones_like(self.ids)
        self.step_index = 0

    def step(self, timer: PhaseTimer | None = None) -> dict:
        phase = timer or (lambda name: contextlib.nullcontext())
        self.model.phase_timer = timer
        gen = torch.Generator(device=self.device).manual_seed(self.step_index)
        self.step_index += 1
        mlm_ids, mlm_labels = losses.mask_tokens(self.ids, self.cfg.model.vocab_size, 4, 0, 2,
                                                 self.cfg.model.mlm_probability, generator=gen)
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast == "bf16"
               else contextlib.nullcontext())
        with ctx:
            out = self.model(self.images, self.ids, self.mask, mlm_ids, mlm_labels,
                             alpha=self.cfg.model.alpha, generator=gen)
        with phase("backward"):
            out["loss"].backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with phase("ema"):
            self.model.momentum_update()
        if self.bench["queue_broadcast"] == "true":
            with phase("queue_broadcast"):
                broadcast_buffers(self.model)
        return out


def broadcast_buffers(model) -> None:
    """What DDP does by default every step: rank 0's buffers (the 2 x 256 x 65,536 queues)
    sent to every rank. In one process it is a copy of the same size."""
    import torch.distributed as dist
    for buf in model.buffers():
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(buf, 0)
        else:
            buf.copy_(buf.clone())


def make_optimizer(model, cfg: Config, device: torch.device, fused: bool):
    from .train.engine import param_groups
    groups = param_groups(model, cfg.train.weight_decay)
    if fused and device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, lr=cfg.train.lr, adam_w_mode=True)
        except Exception:
            return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=fused)


def timed_steps(runners: list[Runner], steps: int, warmup: int) -> list[list[float]]:
    """Alternate the runners' steps; returns each runner's step times (seconds)."""
    times = [[] for _ in runners]
    for i in range(warmup + steps):
        for j, r in enumerate(runners):
            PhaseTimer(r.device).sync()
            t = time.perf_counter()
            r.step()
            PhaseTimer(r.device).sync()
            if i >= warmup:
                times[j].append(time.perf_counter() - t)
    return times


def report(name: str, runner: Runner, times: list[float], batch: int, flops_per_pair: float,
           peak: float | None) -> dict:
    phases = PhaseTimer(runner.device)
    for _ in range(max(1, min(3, len(times)))):
        runner.step(phases)
    n = max(1, min(3, len(times)))
    step_s = statistics.median(times)
    pairs_s = batch / step_s
    result = {
        "options": name, "batch": batch, "step_s": step_s, "pairs_per_s": pairs_s,
        "flops_per_pair": flops_per_pair, "achieved_tflops": pairs_s * flops_per_pair / 1e12,
        "phases_ms": {k: 1000 * v / n for k, v in phases.totals.items()},
    }
    if peak:
        result["mfu"] = pairs_s * flops_per_pair / peak
    if runner.device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(runner.device) / 2**30
    return result


def print_result(r: dict) -> None:
    extra = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else f", {r['achieved_tflops'] * 1000:.1f} GFLOP/s achieved"
    mem = f", peak memory {r['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in r else ""
    print(f"[{r['options']}] {r['pairs_per_s']:.1f} pairs/s ({1000 * r['step_s']:.1f} ms/step, batch {r['batch']}){extra}{mem}")
    total = sum(r["phases_ms"].values())
    for k, v in sorted(r["phases_ms"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:22s} {v:9.2f} ms  {100 * v / max(total, 1e-9):5.1f}%")


def run(args) -> int:
    from .model_info import analytic_flops, device_peak_flops

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = args.compare or [args.options]
    runners, names, cfgs = [], [], []
    for spec in specs:
        overrides, bench = parse_options(spec)
        cfg = load_config(args.config, list(args.overrides) + overrides)
        batch = args.batch or cfg.train.micro_batch_size
        text_len = args.text_len or cfg.data.max_tokens
        runners.append(Runner(cfg, bench, batch, text_len, device))
        names.append(spec)
        cfgs.append(cfg)
    batch = runners[0].images.shape[0]
    text_len = runners[0].ids.shape[1]
    flops = analytic_flops(cfgs[0], text_len)["total"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    times = timed_steps(runners, args.steps, args.warmup)
    results = []
    for name, runner, t in zip(names, runners, times):
        dtype = "bf16" if runner.autocast == "bf16" else "fp32"
        r = report(name, runner, t, batch, flops, device_peak_flops(dev_name, dtype))
        r.update({"device": dev_name, "config": args.config, "text_len": text_len})
        results.append(r)
        print_result(r)
    out = {"results": results}
    if args.compare:
        out["speedup"] = results[1]["pairs_per_s"] / results[0]["pairs_per_s"]
        print(f"{names[1]} / {names[0]}: {out['speedup']:.2f}x pairs/s (medians of {args.steps} interleaved steps)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
