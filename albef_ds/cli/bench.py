"""``albef-ds bench``: time the training step.

    albef-ds bench --config tiny                         # Trainer.train_step: engine, ZeRO, EMA, ...
    albef-ds bench --config tiny --data                  # ... on the first batch of data.train_dirs
    albef-ds bench --config tiny --engine-free --options reference   # the reference's way, no engine
    albef-ds bench --config tiny --engine-free --compare reference fast --steps 20
    albef-ds bench --config mid --engine-free --switches # each fast path alone, both ways
    albef-ds bench --config albef-base --scaling         # bytes per step, 8/64/512 GPUs

The default times :meth:`albef_ds.train.trainer.Trainer.train_step` itself, on one rank:
the DeepSpeed engine with the configured ZeRO stage and precision (fp32 master), the fp32
momentum EMA, negatives as configured. ``--engine-free`` times the same objective
(albef_ds.objectives.pretrain) and EMA on a plain torch optimizer, without DeepSpeed, so
that option sets can be interleaved in one process:

An option set is a preset name (``fast``, ``fast-bf16``, ``reference``) or comma-separated
switches ``key=value``, presets included (``fast,compile=true``): config keys
(``model.sdpa=false``) and bench keys (``autocast=bf16``, ``compile=true``,
``queue_broadcast=true``, ``fused_adam=true``, ``host_sync=true``; ``compile`` takes
``true``/``default`` or ``reduce-overhead``). Each step also runs the Trainer's stop check
(train.stop_check_every / stop_check_async: on one rank the reduce is skipped, the host
sync kept) and, with model.fp8, the Trainer's Transformer Engine path (CUDA only: on a CPU
``--switches`` skips it). ``--compare A B``
builds both models and alternates their steps in one process, so machine noise hits both
alike, and prints B's speed-up over A: the ratio of median step times and the quartiles
of the per-step ratios of adjacent steps. ``--switches`` does that for every switch in
:data:`SWITCHES`, after a fast-vs-fast pair that shows the noise floor.

FLOPs per pair are the analytic count of the reference algorithm (albef_ds.model_info):
the project's single MFU definition. Next to it the report gives the FLOPs the configured
fast paths execute (``executed_flops``), so work they skip is never counted as throughput.
On a CPU the report gives achieved GFLOP/s instead of MFU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from ..config import Config, load_config
from ..errors import UsageError
from ..objectives.mlm import mask_inputs
from ..objectives.pretrain import albef_forward


class SyntheticTokens:
    """The special ids of the synthetic captions (the tokenizer-free bench's vocabulary):
    0 padding, 2 [CLS], 3 [SEP], 4 [MASK]; ordinary tokens from 5 up."""
    pad_token_id, cls_token_id, sep_token_id, mask_token_id, first_word_id = 0, 2, 3, 4, 5


def synthetic_batch(cfg: Config, batch: int, text_len: int, device=torch.device("cpu")) -> dict:
    """A loader-shaped batch: random images, captions of different lengths (padding to the
    longest, as real batches have), distinct image ids."""
    g = torch.Generator().manual_seed(0)
    res, vocab = cfg.model.image_res, cfg.model.vocab_size
    t = SyntheticTokens
    ids = torch.randint(t.first_word_id, vocab, (batch, text_len), generator=g)
    ids[:, 0] = t.cls_token_id
    mask = torch.ones_like(ids)
    for i in range(batch):
        n = text_len - (i * 7) % max(1, text_len // 2)
        ids[i, n - 1] = t.sep_token_id
        ids[i, n:] = t.pad_token_id
        mask[i, n:] = 0
    return {"image": torch.randn(batch, 3, res, res, generator=g).to(device), "text_ids": ids.to(device),
            "text_mask": mask.to(device), "image_id": torch.arange(batch, device=device),
            "key": [f"synthetic/{i}" for i in range(batch)]}

#: Switches of the reference ALBEF implementation (fp32, eager attention, a Python loop of
#: multinomial draws, full-vocabulary MLM head, per-parameter EMA, fusion K/V recomputed
#: per pass, queues broadcast every step as DDP does with buffers).
PRESETS = {
    "reference": "model.sdpa=false,model.share_cross_kv=false,model.mlm_masked_only=false,"
                 "model.itm_vectorized_sampling=false,model.foreach_ema=false,"
                 "model.activation_checkpointing=false,model.itm_negatives=local,"
                 "model.itc_candidates=local,autocast=none,compile=false,"
                 "queue_broadcast=true,fused_adam=false,host_sync=true,"
                 "train.stop_check_every=1,train.stop_check_async=false,model.mlm_masked_bucket=0,model.fp8=false",
    # Every fast path that leaves the fp32 numbers as they are (tests/test_bench.py checks
    # that it gives the reference's losses). The bench runs one rank, where the global ITM
    # candidates are the local batch: local negatives draw the same ones without
    # re-encoding the negative texts (which the global path does for other ranks' texts).
    "fast": "model.sdpa=true,model.share_cross_kv=true,model.mlm_masked_only=true,model.itm_negatives=local,"
            "model.itm_vectorized_sampling=true,model.foreach_ema=true,"
            "model.activation_checkpointing=false,autocast=none,compile=false,"
            "queue_broadcast=false,fused_adam=true,host_sync=false,"
            "train.stop_check_every=10,train.stop_check_async=true",
    # ... plus bf16 autocast: different rounding, so a preset of its own.
    "fast-bf16": "fast,autocast=bf16",
}
BENCH_KEYS = {"autocast": "none", "compile": "false", "queue_broadcast": "false", "fused_adam": "true",
              "host_sync": "false"}

#: The switches measured one by one (``--switches``): (name, value in the reference, value
#: in the fast path). Each is timed against the reference with only it flipped, and the
#: fast path against the fast path with only it flipped back.
SWITCHES = [
    ("model.sdpa", "false", "true"),
    ("model.share_cross_kv", "false", "true"),
    ("model.mlm_masked_only", "false", "true"),
    ("model.itm_vectorized_sampling", "false", "true"),
    ("model.foreach_ema", "false", "true"),
    ("fused_adam", "false", "true"),
    ("queue_broadcast", "true", "false"),
    ("host_sync", "true", "false"),
    ("autocast", "none", "bf16"),
    ("model.activation_checkpointing", "false", "true"),
    ("compile", "false", "true"),
    ("compile", "false", "reduce-overhead"),
    ("train.stop_check_every", "1", "10"),
    ("train.stop_check_async", "false", "true"),
    # the head's gradients round differently (tests/objectives/test_mlm_bucket.py): not in "fast"
    ("model.mlm_masked_bucket", "0", "64"),
    # not the bf16 numbers (fp8_accuracy_check); CUDA with compute capability >= 8.9 only
    ("model.fp8", "false", "true"),
]
#: switches that need CUDA: ``--switches`` on a CPU reports them as skipped
CUDA_ONLY = {"model.fp8"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides
    p.add_argument("--config", required=True, help="YAML config or preset name")
    add_overrides(p, "override a value of the timed config (repeatable)")
    p.add_argument("--data", action="store_true",
                   help="time the Trainer on the first batch of data.train_dirs (default: a synthetic batch)")
    p.add_argument("--engine-free", action="store_true",
                   help="time the objective on a plain torch optimizer, without DeepSpeed (option sets, "
                        "--compare, --switches)")
    p.add_argument("--options", default="fast", help="engine-free option set: fast, fast-bf16, reference, "
                                                     "or key=value,...")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two engine-free option sets, interleaved")
    p.add_argument("--switches", action="store_true",
                   help="time each fast-path switch alone: reference vs reference+switch and "
                        "fast-minus-switch vs fast, each pair interleaved")
    p.add_argument("--only", default=None, help="with --switches: comma-separated switch names")
    p.add_argument("--scaling", action="store_true",
                   help="print the communication/scaling model of this config (no timing)")
    p.add_argument("--scaling-batch", type=int, default=None, help="pairs per GPU in the scaling model")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default: train.micro_batch_size)")
    p.add_argument("--text-len", type=int, default=None, help="tokens per caption (default: data.max_tokens)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase timing steps")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
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
            raise UsageError(f"--options: unknown switch '{key}' (config keys look like model.sdpa; "
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


#: the scalar outputs a training loop logs every step
LOGGED = ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc", "pos_sim", "neg_sim")


class Runner:
    """One option set: a model, its optimizer, and a fixed synthetic batch."""

    def __init__(self, cfg: Config, bench: dict, batch: int, text_len: int, device: torch.device):
        from ..models import ALBEF
        self.cfg, self.bench, self.device = cfg, bench, device
        torch.manual_seed(cfg.train.seed)
        self.model = ALBEF(cfg.model).to(device)
        self.model.train()
        from ..train import fast_paths
        from ..train.stop import StopCheck, StopFlag
        if cfg.model.fp8:  # before the optimizer: te.Linear holds new parameters
            fast_paths.swap_linears_for_fp8(self.model)
        fused = bench["fused_adam"] == "true"
        self.optimizer = make_optimizer(self.model, cfg, device, fused)
        self.autocast = bench["autocast"]
        compile_mode = {"true": "default", "false": "none"}.get(bench["compile"], bench["compile"])
        fast_paths.compile_blocks(self.model, compile_mode)
        # the Trainer's check after each step; a flag no signal sets (the bench keeps its ^C)
        self.stop_check = StopCheck(StopFlag(handle_signals=False), cfg.train.stop_check_every,
                                    cfg.train.stop_check_async)
        synth = synthetic_batch(cfg, batch, text_len, device)
        self.images, self.ids, self.mask = synth["image"], synth["text_ids"], synth["text_mask"]
        from ..train.ema import MomentumEMA
        self.ema = MomentumEMA(self.model, cfg.model.momentum, foreach=cfg.model.foreach_ema)
        self.step_index = 0
        self.logged: list = []  # host floats (host_sync) or device sums
        self.first_step_s: float | None = None

    def saved_activation_bytes(self) -> int:
        """Bytes autograd keeps for the backward of one step (distinct storages, parameters
        excluded): the activation memory that checkpointing trades for recomputation.
        Runs one full step (the runner's draws advance as for any step)."""
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.device.type != "meta":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step()
        return sum(seen.values())

    def step(self, timer: PhaseTimer | None = None) -> dict:
        phase = timer or (lambda name: contextlib.nullcontext())
        self.model.phase_timer = timer
        # Same draws in every runner: masking, ITM negatives and (with dropout) the dropout masks.
        torch.manual_seed(self.cfg.train.seed + self.step_index)
        gen = torch.Generator(device=self.device).manual_seed(self.step_index)
        self.step_index += 1
        mlm_ids, mlm_labels = mask_inputs(self.ids, SyntheticTokens, self.cfg, gen)
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast == "bf16"
               else contextlib.nullcontext())
        from ..train.fast_paths import fp8_autocast
        with ctx, fp8_autocast(self.cfg.model.fp8):
            out = self.model(albef_forward, self.images, self.ids, self.mask, mlm_ids, mlm_labels,
                             alpha=self.cfg.model.alpha, generator=gen)
        with phase("backward"):
            out["loss"].backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with phase("ema"):
            self.ema.update()
        with phase("stop_check"):
            self.stop_check(self.step_index, self.device)
        if self.bench["queue_broadcast"] == "true":
            with phase("queue_broadcast"):
                broadcast_buffers(self.model)
        with phase("logging"):
            if self.bench["host_sync"] == "true":
                # The reference's MetricLogger: loss.item() for every logged value, every step.
                self.logged.append({k: float(out[k].item()) for k in LOGGED})
            else:
                # Device-side sums, read at log steps only (albef_ds.train.metrics.RunningMeans).
                stacked = torch.stack([out[k].detach().float() for k in LOGGED])
                self.logged = [stacked + self.logged[0]] if self.logged else [stacked]
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
    """fused: the Trainer's choice on this device (DeepSpeed/apex fused Adam on CUDA, torch
    foreach on CPU); otherwise the reference's plain torch AdamW."""
    from ..train.engines.deepspeed import build_optimizer
    from ..train.engines.optim import param_groups
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.itm_lr_scale)
    if fused:
        return build_optimizer(groups, cfg, {})[0]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=False)


def timed_steps(runners: list[Runner], steps: int, warmup: int) -> list[list[float]]:
    """Alternate the runners' steps (A B A B ...); returns each runner's step times
    (seconds). The first step of each runner (compilation, allocator warm-up) is kept apart
    in ``runner.first_step_s``."""
    times = [[] for _ in runners]
    for i in range(warmup + steps):
        for j, r in enumerate(runners):
            PhaseTimer(r.device).sync()
            t = time.perf_counter()
            r.step()
            PhaseTimer(r.device).sync()
            dt = time.perf_counter() - t
            if r.first_step_s is None:
                r.first_step_s = dt
            if i >= warmup:
                times[j].append(dt)
    return times


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 2:
        return (xs[0],) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def speedup(times_a: list[float], times_b: list[float]) -> dict:
    """B's speed-up over A: the ratio of median step times, and the quartiles of the
    per-step ratios of adjacent (interleaved) steps, which machine noise hits alike."""
    paired = [a / b for a, b in zip(times_a, times_b)]
    q1, med, q3 = quartiles(paired)
    return {"ratio": statistics.median(times_a) / statistics.median(times_b),
            "paired_q1": q1, "paired_median": med, "paired_q3": q3, "n": len(paired)}


def report(name: str, runner: Runner, times: list[float], batch: int, flops_per_pair: float,
           peak: float | None, phases: bool = True) -> dict:
    timer = PhaseTimer(runner.device)
    n = max(1, min(3, len(times))) if phases else 0
    for _ in range(n):
        runner.step(timer)
    saved = runner.saved_activation_bytes()
    step_s = statistics.median(times)
    pairs_s = batch / step_s
    q1, _, q3 = quartiles(times)
    result = {
        "options": name, "batch": batch, "step_s": step_s, "step_s_q1": q1, "step_s_q3": q3,
        "pairs_per_s": pairs_s, "first_step_s": runner.first_step_s,
        "flops_per_pair": flops_per_pair, "achieved_tflops": pairs_s * flops_per_pair / 1e12,
        "phases_ms": {k: 1000 * v / n for k, v in timer.totals.items()} if n else {},
        "threads": torch.get_num_threads(), "saved_activations_mb": saved / 2**20,
    }
    if runner.bench["compile"] != "false" and runner.first_step_s is not None:
        # the first step traces and compiles every block; later shapes may add a little
        result["compile_s"] = runner.first_step_s - step_s
    if peak:
        result["mfu"] = pairs_s * flops_per_pair / peak
    if runner.device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(runner.device) / 2**30
    else:
        import resource
        result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def print_result(r: dict) -> None:
    extra = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else f", {r['achieved_tflops'] * 1000:.1f} GFLOP/s achieved"
    mem = f", peak memory {r['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in r else ""
    comp = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
    print(f"[{r['options']}] {r['pairs_per_s']:.2f} pairs/s ({1000 * r['step_s']:.1f} ms/step, "
          f"IQR {1000 * r['step_s_q1']:.0f}-{1000 * r['step_s_q3']:.0f}, batch {r['batch']}){extra}{mem}{comp}; "
          f"{r['saved_activations_mb']:.0f} MB saved for backward")
    total = sum(r["phases_ms"].values())
    for k, v in sorted(r["phases_ms"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:22s} {v:9.2f} ms  {100 * v / max(total, 1e-9):5.1f}%")


def build_runner(args, spec: str, device: torch.device) -> tuple[Runner, Config]:
    overrides, bench = parse_options(spec)
    cfg = load_config(args.config, list(args.overrides) + overrides)
    batch = args.batch or cfg.train.micro_batch_size
    text_len = args.text_len or cfg.data.max_tokens
    return Runner(cfg, bench, batch, text_len, device), cfg


def compare(args, specs: list[str], device: torch.device, phases: bool = True) -> dict:
    """Build the option sets' runners, time them interleaved, report each (and B / A)."""
    from ..model_info import analytic_flops, device_peak_flops

    runners, cfgs = zip(*(build_runner(args, spec, device) for spec in specs))
    batch = runners[0].images.shape[0]
    text_len = runners[0].ids.shape[1]
    flops = analytic_flops(cfgs[0], text_len, batch)["total"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    times = timed_steps(list(runners), args.steps, args.warmup)
    results = []
    for name, runner, t in zip(specs, runners, times):
        dtype = "bf16" if runner.autocast == "bf16" else "fp32"
        r = report(name, runner, t, batch, flops, device_peak_flops(dev_name, dtype), phases)
        r.update({"device": dev_name, "config": str(args.config), "text_len": text_len})
        results.append(r)
    out = {"results": results}
    if len(specs) == 2:
        out.update(speedup(times[0], times[1]))
    return out


def switch_specs(name: str, ref_value: str, fast_value: str) -> list[tuple[str, str, str]]:
    """(label, A, B) pairs timing one switch: alone on the reference, and removed from the
    fast path (or, for a switch the fast preset leaves off, added to it)."""
    overrides, bench = parse_options("fast")
    in_fast = dict(o.split("=", 1) for o in overrides).get(name, bench.get(name)) == fast_value
    second = ((f"{name} off fast", f"fast,{name}={ref_value}", "fast") if in_fast
              else (f"{name} on fast", "fast", f"fast,{name}={fast_value}"))
    return [(f"{name} on reference", "reference", f"reference,{name}={fast_value}"), second]


def run_switches(args, device: torch.device) -> dict:
    chosen = set(args.only.split(",")) if args.only else None
    rows = []
    # (switch, label, A, B); the first shows what machine noise alone does to a ratio
    pairs = [("none", "noise floor (fast vs fast)", "fast", "fast")]
    for name, ref_value, fast_value in SWITCHES:
        if chosen is not None and name not in chosen and name.split(".")[-1] not in chosen:
            continue
        if name in CUDA_ONLY and device.type != "cuda":
            print(f"{name}: skipped (needs CUDA)", flush=True)
            rows.append({"switch": name, "skipped": "needs CUDA"})
            continue
        pairs += [(name, *spec) for spec in switch_specs(name, ref_value, fast_value)]
    for name, label, a, b in pairs:
        out = compare(args, [a, b], device, phases=False)
        ra, rb = out["results"]
        row = {"switch": name, "label": label, "a": a, "b": b,
               "a_pairs_per_s": ra["pairs_per_s"], "b_pairs_per_s": rb["pairs_per_s"],
               "a_saved_mb": ra["saved_activations_mb"], "b_saved_mb": rb["saved_activations_mb"],
               **{k: out[k] for k in ("ratio", "paired_q1", "paired_median", "paired_q3", "n")}}
        for r in (ra, rb):
            if "compile_s" in r:
                row["compile_s"] = r["compile_s"]
        rows.append(row)
        print(f"{label:42s} {row['a_pairs_per_s']:8.2f} -> {row['b_pairs_per_s']:8.2f} pairs/s  "
              f"x{row['ratio']:.3f} (paired steps: median {row['paired_median']:.3f}, "
              f"IQR {row['paired_q1']:.3f}-{row['paired_q3']:.3f}, n={row['n']}); saved for backward "
              f"{row['a_saved_mb']:.0f} -> {row['b_saved_mb']:.0f} MB", flush=True)
    return {"switches": rows}


def trainer_bench(args) -> dict:
    """Time Trainer.train_step on one rank (the engine, ZeRO, the EMA: what pretraining runs)."""
    from .. import distributed as dist_lib
    from ..model_info import analytic_flops, device_peak_flops, executed_flops
    from ..train.trainer import Trainer, check_data_dirs, make_objective

    cfg = load_config(args.config, list(args.overrides))
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    if launch.world_size != 1:
        raise UsageError("albef-ds bench times one rank: run it without a multi-rank launcher")
    if args.data:
        from ..data import build_train_loader
        from ..tokenizer import load_tokenizer
        check_data_dirs(cfg)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        cfg.model.vocab_size = len(tokenizer)
        loader = build_train_loader(cfg, tokenizer, 0, 1, local_world_size=1)
        batch = next(iter(loader))
    else:
        tokenizer = SyntheticTokens
        batch = synthetic_batch(cfg, args.batch or cfg.train.micro_batch_size, args.text_len or cfg.data.max_tokens)
    objective = make_objective(cfg, tokenizer)
    steps = args.warmup + args.steps
    trainer = Trainer(cfg, launch, objective, total_steps=steps, steps_per_epoch=max(1, steps), log=lambda *a: None)
    timer = PhaseTimer(trainer.device)
    losses, times = [], []
    for i in range(steps):
        timer.sync()
        t = time.perf_counter()
        out, _ = trainer.train_step(batch)
        timer.sync()
        times.append(time.perf_counter() - t)
        losses.append({k: float(out[k].detach()) for k in objective.log_keys})
    pairs = batch["image"].shape[0]
    text_len = batch["text_ids"].shape[1]
    step_s = statistics.median(times[args.warmup:] or times)
    ref_flops = analytic_flops(cfg, text_len, pairs)["total"]
    run_flops = executed_flops(cfg, text_len, pairs)
    dev_name = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    peak = device_peak_flops(dev_name, trainer.engine.precision)
    result = {"mode": "trainer", "objective": objective.name, "engine": trainer.engine.name,
              "zero_stage": getattr(trainer.engine, "zero_stage", None),
              "precision": trainer.engine.precision, "optimizer": trainer.engine.optimizer_name,
              "batch": pairs, "text_len": text_len, "step_s": step_s, "pairs_per_s": pairs / step_s,
              "first_step_s": times[0], "reference_flops_per_pair": ref_flops, "executed_flops_per_pair": run_flops,
              "reference_tflops": pairs / step_s * ref_flops / 1e12,
              "executed_tflops": pairs / step_s * run_flops / 1e12, "losses": losses, "device": dev_name}
    if peak:
        result["mfu"] = pairs / step_s * ref_flops / peak
    print(f"[Trainer.train_step, objective {objective.name}, {trainer.engine.describe()}] {result['pairs_per_s']:.2f} pairs/s ({1000 * step_s:.1f} ms/step, batch {pairs}); "
          f"reference algorithm {result['reference_tflops'] * 1000:.1f} GFLOP/s, executed "
          f"{result['executed_tflops'] * 1000:.1f} GFLOP/s"
          + (f", MFU {100 * result['mfu']:.1f}%" if peak else ""))
    return result


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scaling:
        from .. import scaling
        cfg = load_config(args.config, list(args.overrides))
        out = scaling.report(cfg, batch=args.scaling_batch, text_len=args.text_len)
        print(scaling.format_report(out))
        _write_json(args.json, out)
        return 0
    if not args.engine_free:
        if args.compare or args.switches or args.options != "fast":
            raise UsageError("--options, --compare and --switches time engine-free steps: add --engine-free")
        out = trainer_bench(args)
        out["torch"] = torch.__version__
        out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        _write_json(args.json, out)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.switches:
        out = run_switches(args, device)
    else:
        specs = args.compare or [args.options]
        out = compare(args, list(specs), device, phases=not args.no_phases)
        for r in out["results"]:
            print_result(r)
        if args.compare:
            print(f"{specs[1]} / {specs[0]}: {out['ratio']:.2f}x pairs/s (medians of {args.steps} "
                  f"interleaved steps; per-step ratios: median {out['paired_median']:.2f}, "
                  f"IQR {out['paired_q1']:.2f}-{out['paired_q3']:.2f})")
    out["torch"] = torch.__version__
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _write_json(args.json, out)
    return 0


def _write_json(path, out: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2))


def fp8_accuracy_check(config: str = "tiny", overrides=(), steps: int = 5, batch: int | None = None,
                       text_len: int | None = None, rtol: float = 0.05, device: str = "cuda") -> dict:
    """FP8 GEMMs (model.fp8) against bf16 autocast on the first ``steps`` steps: the same
    initial weights, inputs, masking and ITM draws, the two runners' steps interleaved.
    Returns each step's loss terms for both, the largest relative difference per term and
    ``ok`` (every term of every step within ``rtol``; 5 % by default: FP8's E4M3 keeps 3
    mantissa bits, bf16 7, so the first steps' losses agree to a few per cent, while a
    wrong scale or a broken swap moves them by far more). For ``albef-ds gpu-check``;
    raises UsageError without CUDA >= 8.9 and transformer-engine."""
    from ..train.fast_paths import require_fp8
    require_fp8()
    dev = torch.device(device)
    runners = []
    for spec in ("fast-bf16", "fast-bf16,model.fp8=true"):
        o, b = parse_options(spec)
        cfg = load_config(config, list(overrides) + o)
        runners.append(Runner(cfg, b, batch or cfg.train.micro_batch_size, text_len or cfg.data.max_tokens, dev))
    keys = ("loss", "loss_itc", "loss_itm", "loss_mlm")
    rows = []
    for step in range(steps):
        outs = [r.step() for r in runners]
        rows.append({name: {k: float(o[k].detach()) for k in keys} for name, o in zip(("bf16", "fp8"), outs)})
    worst = {k: max(abs(r["fp8"][k] - r["bf16"][k]) / max(abs(r["bf16"][k]), 1e-6) for r in rows) for k in keys}
    return {"steps": rows, "max_rel_diff": worst, "rtol": rtol, "ok": all(v <= rtol for v in worst.values()),
            "device": torch.cuda.get_device_name(dev)}
