"""The pieces of ``albef-ds gpu-check``: one prepared check of a lent GPU (docs/gpu.md).

Each function measures one thing and returns a JSON-able dict; ``albef-ds gpu-check``
(albef_ds/cli/gpu_check.py) runs them in order, times the Trainer's step through the
bench's own machinery, and writes the JSON and the markdown table with
:func:`markdown_table`.

- :func:`environment`: torch, CUDA, the device, DeepSpeed and its FusedAdam op, flash
  SDPA, bf16.
- :func:`largest_batch`: the largest batch a measurement fits, by doubling until
  ``torch.cuda.OutOfMemoryError``.
- :func:`kill_resume`: a pretraining run, the same run stopped by a real SIGTERM at a
  chosen step (the Trainer's stop logic saves and exits) and resumed, compared for
  exactness by :func:`compare_runs`: per-step losses and the final weights, momentum and
  queues.
- :func:`fp16_check`: DeepSpeed fp16 with dynamic loss scaling for a few steps (DeepSpeed
  refuses fp16 on a CPU).

Nothing here parses arguments or prints for the user, beyond the Trainer's own log lines.
"""
from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from .config import load_config
from .train.stop import StopFlag

#: the logged values a resumed run must reproduce bit for bit
LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_mlm")

CPU_FP16_SKIP = "skipped: needs CUDA (DeepSpeed refuses fp16 on CPU)"


# ---------------------------------------------------------------------- environment

def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the report says which
        return None


def environment() -> dict:
    """What the machine offers the step: versions, the device, and whether the fast
    kernels the step relies on are there (each trial's error text kept when it fails)."""
    cuda = torch.cuda.is_available()
    env = {"torch": torch.__version__, "cuda_version": torch.version.cuda, "cuda_available": cuda,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "deepspeed": _version("deepspeed"), "streaming": _version("streaming"),
           "transformers": _version("transformers"), "timm": _version("timm")}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update({"capability": f"{props.major}.{props.minor}", "memory_gb": props.total_memory / 2**30,
                    "bf16_supported": torch.cuda.is_bf16_supported()})
    else:
        env["bf16_supported"] = "cpu (autocast only)"
    env["fused_adam"] = _fused_adam_status() if cuda else "skipped: needs CUDA"
    env["flash_sdpa"] = _flash_sdpa() if cuda else "skipped: needs CUDA"
    return env


def _fused_adam_status() -> dict:
    from .train.engines.deepspeed import fused_adam_status
    return fused_adam_status()


def _flash_sdpa() -> dict:
    """Whether the flash kernel is enabled and actually runs on a bf16 head-dim-64 case
    (ALBEF's heads), forced through ``sdpa_kernel`` so a silent fallback cannot hide."""
    import torch.nn.functional as F
    out = {"enabled": bool(torch.backends.cuda.flash_sdp_enabled())}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q = torch.randn(2, 12, 257, 64, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize()
        out["runs"] = True
    except Exception as e:
        out.update(runs=False, error=" ".join(str(e).split())[:300])
    return out


# ---------------------------------------------------------------------- memory

def free_cuda() -> None:
    """Give back what a failed (out-of-memory) attempt left: the caller must have dropped
    its references first (the exception's traceback holds the frames)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_peak_memory(measure: Callable[[], dict]) -> dict:
    """``measure()``'s result plus the peak CUDA memory it allocated (GiB)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = measure()
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def is_oom(error: BaseException) -> bool:
    # DeepSpeed and some kernels re-raise the allocator's error as a plain RuntimeError
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(measure: Callable[[int], dict], start: int, limit: int) -> dict:
    """Double the batch from ``start`` until ``measure(batch)`` runs out of memory or the
    batch passes ``limit``; returns {"largest": the last batch that fitted (None when
    ``start`` did not), "result": its measurement, "tried": [(batch, "ok"|"oom")]}."""
    tried, best, result = [], None, None
    batch = start
    while batch <= limit:
        failed = False
        try:
            r = measure(batch)
        except Exception as e:
            if not is_oom(e):
                raise
            failed = True
        if failed:  # out of the except block: the traceback (and its tensors) are gone
            free_cuda()
            tried.append([batch, "oom"])
            break
        tried.append([batch, "ok"])
        best, result = batch, r
        free_cuda()
        batch *= 2
    return {"largest": best, "result": result, "tried": tried, "limit": limit,
            "reached_limit": bool(tried) and tried[-1][1] == "ok"}


# ---------------------------------------------------------------------- kill and resume

class SignalAtStep(StopFlag):
    """The Trainer's stop flag that sends its own process ``sig`` after optimizer step
    ``step``: a real signal, handled by the real handler, at a chosen step instead of a
    race with a watcher (a tiny model's steps take milliseconds on a GPU). The Trainer
    asks :meth:`agreed` once per step before the last, so the n-th call follows step n of
    a fresh run."""

    def __init__(self, step: int, sig: int = signal.SIGTERM):
        super().__init__()
        self.at, self.sig, self.calls = step, sig, 0

    def agreed(self, device: torch.device) -> bool:
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(self.sig)
        return super().agreed(device)


@contextlib.contextmanager
def _signal_handlers_kept():
    """A StopFlag takes over SIGTERM/SIGINT/SIGUSR1 for good; the check runs several
    trainings in one process and gives the handlers back after each."""
    sigs = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in sigs}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def pretrain(config: str, overrides: list[str], run_dir: Path, resume: str = "none",
             stop_at: int | None = None) -> int:
    """One in-process pretraining run (the same ``train`` as ``albef-ds pretrain``),
    SIGTERMed after step ``stop_at`` when given."""
    from . import distributed as dist_lib
    from .train.trainer import train
    with _signal_handlers_kept():
        stop = StopFlag() if stop_at is None else SignalAtStep(stop_at)
        cfg = load_config(config, [*overrides, f"logging.run_dir={run_dir}"])
        launch = dist_lib.init_distributed(cfg.distributed.backend)
        return train(cfg, launch, resume, stop=stop)


def per_step(run_dir: Path) -> dict[int, dict]:
    """step -> its metrics line (a resumed run appends; the last line of a step wins; a
    resume's marker row is no step's line)."""
    import json

    from .train.metrics import is_event
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not is_event(row):
            out[row["step"]] = row
    return out


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's consolidated weights, momentum copies and queues."""
    from .train.export import consolidate, resolve_checkpoint
    tag_dir = resolve_checkpoint(str(run_dir))
    cfg = load_config(Path(run_dir) / "config.yaml")
    return consolidate(tag_dir, cfg).state_dict()


def compare_runs(ref: dict[int, dict], got: dict[int, dict], from_step: int,
                 ref_state: dict | None = None, got_state: dict | None = None) -> dict:
    """Exactness of a resumed run against the uninterrupted one: every logged loss from
    ``from_step`` on equal bit for bit, the same steps present, and (when given) every
    tensor of the final state equal. ``exact`` is False on any difference, on a missing
    step, and when there is nothing to compare (an empty comparison proves nothing)."""
    steps = [s for s in sorted(ref) if s >= from_step]
    missing = [s for s in steps if s not in got]
    mismatches = []
    for s in steps:
        if s in got:
            for k in LOSS_KEYS:
                if k in ref[s] and got[s].get(k) != ref[s][k]:
                    mismatches.append({"step": s, "key": k, "ref": ref[s][k], "got": got[s].get(k)})
    out = {"compared_steps": len(steps) - len(missing), "from_step": from_step, "missing_steps": missing,
           "loss_mismatches": mismatches[:20], "n_loss_mismatches": len(mismatches)}
    exact = bool(steps) and not missing and not mismatches
    if ref_state is not None and got_state is not None:
        differ, max_diff = [], 0.0
        for name in sorted(set(ref_state) | set(got_state)):
            a, b = ref_state.get(name), got_state.get(name)
            if a is None or b is None or a.shape != b.shape:
                differ.append(name)
            elif not torch.equal(a, b):
                differ.append(name)
                max_diff = max(max_diff, (a.double() - b.double()).abs().max().item())
        out.update(tensors=len(ref_state), tensors_differing=len(differ), differing=differ[:20],
                   max_abs_diff=max_diff)
        exact = exact and bool(ref_state) and not differ
    out["exact"] = exact
    return out


def kill_resume(config: str, overrides: list[str], root: Path, steps: int, stop_at: int) -> dict:
    """Train ``steps`` steps uninterrupted; train again, stopped by SIGTERM after step
    ``stop_at`` (the Trainer saves and returns EXIT_PREEMPTED), resume with ``auto``; and
    compare the two from step ``stop_at + 1``."""
    from .train.stop import EXIT_PREEMPTED
    if not 0 < stop_at < steps:
        raise ValueError(f"stop_at must lie inside the run: 0 < {stop_at} < {steps}")
    overrides = [*overrides, f"train.max_steps={steps}", "logging.log_every=1"]
    root = Path(root)
    t = time.perf_counter()
    status_ref = pretrain(config, overrides, root / "uninterrupted")
    status_stop = pretrain(config, overrides, root / "killed", stop_at=stop_at)
    stopped_at = max(per_step(root / "killed"))
    status_resume = pretrain(config, overrides, root / "killed", resume="auto")
    out = compare_runs(per_step(root / "uninterrupted"), per_step(root / "killed"), stop_at + 1,
                       final_state(root / "uninterrupted"), final_state(root / "killed"))
    interrupted = status_stop == EXIT_PREEMPTED and stopped_at == stop_at
    out.update(steps=steps, signal="SIGTERM", stop_requested_after=stop_at, stopped_at=stopped_at,
               exit_status={"uninterrupted": status_ref, "stopped": status_stop, "resumed": status_resume},
               interrupted=interrupted, seconds=time.perf_counter() - t)
    # a stop that did not happen, or a run that did not finish, makes the comparison vacuous
    out["ok"] = bool(out["exact"] and interrupted and status_ref == 0 and status_resume == 0)
    return out


# ---------------------------------------------------------------------- fp16

def loss_scale_of(engine) -> float | None:
    """The dynamic loss scale DeepSpeed's fp16 optimizer holds now (its attribute moved
    between versions and optimizers)."""
    opt = engine.optimizer
    for owner, name in ((opt, "loss_scale"), (opt, "cur_scale"), (getattr(opt, "loss_scaler", None), "cur_scale")):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            return float(value)
    return None


def fp16_check(config: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    """``steps`` Trainer steps with DeepSpeed fp16 and dynamic loss scaling on the data of
    ``overrides``: the loss scale before each step, the losses, whether each is finite,
    and the steps DeepSpeed skipped on an overflow (expected at first: the scale starts at
    2^16 and halves on each overflow)."""
    if not torch.cuda.is_available():
        return {"status": CPU_FP16_SKIP}
    # train.precision stays "auto": an explicit fp16 would replace the JSON's fp16 section
    # (its loss-scale settings) by {"enabled": true} (train/engines/deepspeed.py load_ds_config)
    return scaled_steps(config, [*overrides, "distributed.ds_config=zero2_fp16", "train.precision=auto"],
                        steps, run_dir)


def scaled_steps(config: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    """``steps`` Trainer steps on the loader of ``overrides``, the engine's loss scale read
    before each (None where the engine has none); the loop of :func:`fp16_check`, which a
    CPU can run in fp32."""
    from . import distributed as dist_lib
    from .tokenizer import load_tokenizer
    from .train.trainer import Trainer, make_objective

    cfg = load_config(config, [*overrides, f"train.max_steps={steps}", f"logging.run_dir={run_dir}"])
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg.model.vocab_size = len(tokenizer)
    objective = make_objective(cfg, tokenizer)
    loader = objective.make_loader(cfg, 0, 1, 1, 0, str(run_dir))
    trainer = Trainer(cfg, launch, objective, total_steps=steps, steps_per_epoch=steps, log=lambda *a: None)
    engine = trainer.engine.engine
    rows = []
    batches = iter(loader)
    for _ in range(steps):
        scale = loss_scale_of(engine)
        out, _ = trainer.train_step(next(batches))
        losses = {k: float(out[k].detach()) for k in LOSS_KEYS if k in out}
        rows.append({"step": trainer.step, "loss_scale": scale, **losses,
                     "finite": all(math.isfinite(v) for v in losses.values())})
    result = {"status": "ran", "precision": trainer.engine.precision, "steps": rows,
              "loss_scales": [r["loss_scale"] for r in rows], "final_loss_scale": loss_scale_of(engine),
              "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
              "all_finite": all(r["finite"] for r in rows)}
    del trainer, engine, loader, batches
    from .data import shm
    shm.release(run_dir)  # what the loader left in /dev/shm, as a run's end does
    free_cuda()
    return result


# ---------------------------------------------------------------------- the table

def _fmt(value, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def markdown_table(report: dict) -> str:
    """The report as markdown for docs/benchmarks.md: a heading with the device and date,
    the Trainer's step per batch, each fast path's effect, kill/resume and fp16."""
    env = report["environment"]
    mode = " (CPU DRY RUN: not a measurement)" if report.get("dry_run") else ""
    fa = env.get("fused_adam")
    fused = fa if isinstance(fa, str) else ("loaded" if fa.get("loaded") else f"failed: {fa.get('error', '')[:80]}")
    fl = env.get("flash_sdpa")
    flash = fl if isinstance(fl, str) else ("runs" if fl.get("runs") else f"failed: {fl.get('error', '')[:80]}")
    lines = [f"### gpu-check: {env['device']}, {report['date']}{mode}", "",
             f"torch {env['torch']}, CUDA {env['cuda_version']}, DeepSpeed {env['deepspeed']}; "
             f"FusedAdam: {fused}; flash SDPA: {flash}; bf16: {env['bf16_supported']}", ""]
    step = report.get("trainer_step")
    if step:
        lines += [f"Trainer.train_step, {step['config']} at {step['image_res']} px, {step['precision']}, "
                  f"ZeRO {step['zero_stage']}, {step['optimizer']} (MFU: reference-algorithm FLOPs / peak; "
                  f"executed: the FLOPs the fast paths run / peak)", "",
                  "| batch | pairs/s | ms/step | MFU | executed-FLOP util. | peak memory GiB |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in step["results"]:
            lines.append(f"| {r['batch']} | {r['pairs_per_s']:.1f} | {1000 * r['step_s']:.1f} | "
                         f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('executed_util'), '.1%')} | "
                         f"{_fmt(r.get('peak_memory_gb'), '.1f')} |")
        search = step.get("largest_batch")
        if search:
            note = "(the search limit)" if search.get("reached_limit") else "(the next doubling ran out of memory)"
            lines += ["", f"Largest batch that fits: {search['largest']} {note}; tried "
                          + ", ".join(f"{b} {s}" for b, s in search["tried"])]
        lines.append("")
    sw = report.get("switches")
    if sw:
        lines += [f"Fast paths one by one (engine-free step, batch {sw['batch']}, {sw['steps']} interleaved "
                  f"steps; ratio = A's median step time / B's)", "",
                  "| switch | comparison | A pairs/s | B pairs/s | B / A |", "|---|---|---:|---:|---:|"]
        for r in sw["rows"]:
            lines.append(f"| {r['switch']} | {r['label']} | {r['a_pairs_per_s']:.1f} | "
                         f"{r['b_pairs_per_s']:.1f} | {r['ratio']:.3f} |")
        lines.append("")
    kr = report.get("kill_resume")
    if kr:
        lines += ["| check | result |", "|---|---|"]
        if "error" in kr:
            lines.append(f"| kill/resume | error: {kr['error']} |")
        else:
            lines.append(f"| kill/resume ({kr['steps']} steps, {kr['signal']} after step {kr['stop_requested_after']}) | "
                         f"{'EXACT' if kr['ok'] else 'FAILED'}: {kr['compared_steps']} steps' losses, "
                         f"{kr.get('tensors_differing', '?')} of {kr.get('tensors', '?')} tensors differ |")
    fp = report.get("fp16")
    if fp:
        if not kr:
            lines += ["| check | result |", "|---|---|"]
        if fp.get("status") != "ran":
            lines.append(f"| fp16 loss scaling | {fp.get('status')} |")
        else:
            scales = ", ".join(_fmt(s, ".0f") for s in fp["loss_scales"])
            lines.append(f"| fp16 loss scaling ({len(fp['steps'])} steps) | scales {scales}; "
                         f"{'all losses finite' if fp['all_finite'] else 'NON-FINITE losses'}; "
                         f"{fp['skipped_steps']} steps skipped on overflow |")
    return "\n".join(lines).rstrip() + "\n"
