"""``albef-ds pretrain``: ALBEF pretraining on a DeepSpeed engine, under any launcher.

    deepspeed --num_gpus 8 -m albef_ds.cli pretrain --config configs/albef-base.yaml
    torchrun --nproc_per_node 8 -m albef_ds.cli pretrain --config ...
    srun albef-ds pretrain --config ...          (SLURM variables mapped in distributed.py)
    albef-ds pretrain --config configs/tiny.yaml (one rank)

Per micro-step: mask tokens and draw ITM negatives from a generator seeded by (seed,
step, micro-step, rank), so a resumed run draws exactly what the uninterrupted one drew;
forward / backward / step through the engine; at each optimizer step the fp32 momentum
EMA moves once. SIGUSR1/SIGTERM/SIGINT ask for a stop: the ranks agree on one step (a
flag reduced every step), save, and exit with :data:`EXIT_PREEMPTED`.
"""
from __future__ import annotations

import argparse
import functools
import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import distributed as dist_lib
from .. import losses
from ..config import Config, ConfigError, load_config, save_config

#: exit status of a run stopped by a signal after its checkpoint was committed: the batch
#: script requeues on it. 0 means the planned final step was reached.
EXIT_PREEMPTED = 3
#: marker written in the run directory when the planned final step is reached.
DONE_MARKER = "DONE"
#: the reference's bounds on the contrastive temperature.
TEMP_BOUNDS = (0.001, 0.5)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config or preset name (tiny, albef-base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in the run dir), 'none', or a checkpoint "
                        "directory; default: checkpoint.resume from the config")
    p.add_argument("--run-dir", default=None, help="shortcut for --set logging.run_dir=DIR")


def _start_resource_tracker_deaf_to_sigusr1() -> None:
    """Start multiprocessing's resource tracker with SIGUSR1 blocked (it inherits the mask;
    it ignores SIGINT/SIGTERM itself, not SIGUSR1). SLURM delivers a step's signals to every
    process of the step: a tracker killed by the USR1 warning is relaunched empty, and every
    shared-memory segment unlinked afterwards printed a KeyError traceback at the stop."""
    from multiprocessing import resource_tracker
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopFlag:
    """Set by a signal on any rank; all ranks learn of it at the same step. Created first
    thing, so that a signal during the start-up asks for a stop too (the default action of
    SIGUSR1 would end the rank without a word)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        _start_resource_tracker_deaf_to_sigusr1()

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _worker_ignores_stop_signals(previous_init, worker_id: int) -> None:
    """DataLoader worker init: leave SIGUSR1/SIGTERM/SIGINT to the rank. SLURM signals every
    process of a step (scancel, requeue, preemption): a worker killed by SIGTERM makes the
    rank raise ("DataLoader worker ... killed by signal") instead of saving a checkpoint.
    The rank shuts its workers down itself when it exits."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if previous_init is not None:
        previous_init(worker_id)


def _end_loader_workers() -> None:
    """SIGKILL this process's loader workers before an error unwinds the rank. They ignore
    SIGTERM (see above), and at exit multiprocessing SIGTERMs its daemonic children and then
    joins them: without this, an error in the loop (a bad shard, a bug, a lost peer) hangs
    the rank until the job's time limit instead of ending it."""
    import multiprocessing
    for child in multiprocessing.active_children():
        child.kill()


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63 - 1)


def _check_data_dirs(cfg: Config) -> None:
    if not cfg.data.train_dirs:
        raise ConfigError("config key 'data.train_dirs': no training data given "
                          "(e.g. --set data.train_dirs=[/data/synth/train])")
    for d in cfg.data.train_dirs:
        if "://" not in d and not Path(d).is_dir():
            raise ConfigError(f"config key 'data.train_dirs': data directory not found: {d}")
    if not cfg.data.tokenizer:
        raise ConfigError("config key 'data.tokenizer': a tokenizer folder is required "
                          "(albef-data build-vocab, or a local bert-base-uncased folder)")
    if not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"config key 'data.tokenizer': tokenizer folder not found: {cfg.data.tokenizer}")


def _flops_and_peak(cfg: Config, device: torch.device, dtype: torch.dtype) -> tuple[float, float | None]:
    """Analytic FLOPs per pair (the project's MFU definition) and the device's dense peak."""
    from ..model_info import analytic_flops, device_peak_flops
    flops = analytic_flops(cfg, cfg.data.max_tokens)["total"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return flops, device_peak_flops(name, str(dtype).replace("torch.", ""))


def build_model(cfg: Config, log=print):
    """ALBEF with the configured initial weights (each loader reports what it did)."""
    from ..models import ALBEF
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ALBEF(cfg.model)
    c = cfg.checkpoint
    if c.bert_init or c.vit_init or c.init_from:
        from .. import weights
        if c.init_from:
            log(str(weights.load_albef_checkpoint(model, c.init_from)))
        if c.bert_init:
            log(str(weights.load_hf_bert(model, c.bert_init)))
        if c.vit_init:
            log(str(weights.load_vit_state_dict(model, c.vit_init)))
    return model


def _numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a partition here."""
    return getattr(p, "ds_numel", None) or p.numel()


def config_changes(path: Path, cfg: Config) -> list[str]:
    """'section.key: old -> new' for every value that differs from the saved config."""
    if not path.is_file():
        return []
    import yaml
    old = yaml.safe_load(path.read_text()) or {}
    out = []
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            before = old.get(section, {}).get(key, value)
            if before != value:
                out.append(f"{section}.{key}: {before!r} -> {value!r}")
    return out


def summary(cfg: Config, launch, ds: dict, model, opt_name: str, steps: int, per_epoch: int) -> str:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    frozen = sum(_numel(p) for p in model.parameters() if not p.requires_grad)
    from .engine import precision_of
    lines = [
        "albef-ds pretrain",
        f"  world size {launch.world_size} on {launch.num_nodes} node(s) ({launch.launcher}); "
        f"ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)}; precision {precision_of(ds)}; "
        f"optimizer {opt_name}",
        f"  parameters: {trainable:,} trainable, {frozen:,} momentum (frozen)",
        f"  batch: micro {cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum_steps} x "
        f"world {launch.world_size} = global {cfg.global_batch(launch.world_size)}",
        f"  steps: {steps} ({per_epoch} per epoch); queue {cfg.model.queue_size}; "
        f"ITC candidates {cfg.model.itc_candidates}; ITM negatives {cfg.model.itm_negatives} "
        f"({cfg.model.itm_exchange}); negatives pool {cfg.pool_size(launch.world_size)} rank(s) = "
        f"{cfg.pool_size(launch.world_size) * cfg.train.micro_batch_size} pairs per micro-step",
        f"  data: {', '.join(cfg.data.train_dirs)} (tokenizer {cfg.data.tokenizer})",
        f"  run dir: {cfg.logging.run_dir}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    stop = StopFlag()
    import warnings
    # DeepSpeed calls collectives that torch marks deprecated, once per step per rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"logging.run_dir={args.run_dir}")
    launch = dist_lib.read_launch_env()
    cfg = load_config(args.config, overrides, world_size=launch.world_size)  # fail before any work
    _check_data_dirs(cfg)
    note = cfg.recipe_note(launch.world_size)
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    if note and launch.is_main:
        print(note)
    return train(cfg, launch, args.resume or cfg.checkpoint.resume, stop=stop)


def train(cfg: Config, launch, resume: str, eval_each_epoch: bool = False, keep_best: bool = False,
          stop: "StopFlag | None" = None) -> int:
    """The training loop. ``eval_each_epoch``/``eval.every_steps``: retrieval on
    data.val_dir into metrics (prefix ``val``); ``keep_best``: the checkpoint with the best
    val r_mean is kept (``best.json`` names it) whatever ``keep_last`` says."""
    from ..data import build_train_loader
    from ..tokenizer import load_tokenizer
    from . import checkpoint as ckpt_lib
    from .checkpoint import CheckpointManager, rng_state, set_rng_state
    from .ema import MomentumEMA, assemble_full
    from .engine import clamp_master, clean_shared_memory_leftovers, engine_dtype, initialize
    from .metrics import MetricsLogger, RunningMeans, memory_gb, rewind_jsonl
    from .schedule import alpha_at

    rank, world = launch.rank, launch.world_size
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.logging.run_dir)
    stop = stop or StopFlag()

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(tokenizer) != cfg.model.vocab_size:
        log(f"note: model.vocab_size {cfg.model.vocab_size} -> {len(tokenizer)} (the tokenizer's)")
        cfg.model.vocab_size = len(tokenizer)

    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, rank, world)
    resume_dir = ckpt.resolve(resume)
    resume_meta = ckpt.meta(resume_dir) if resume_dir else None
    universal = resume_meta is not None and resume_meta["world_size"] != world
    if resume_meta:  # everything checked before anything is written
        ckpt_lib.check_resumable(resume_dir, resume_meta, cfg, world)
    if is_main:
        changed = config_changes(run_dir / "config.yaml", cfg) if resume_meta else []
        if changed:
            log("note: the config differs from the run's config.yaml: " + "; ".join(changed))
        save_config(cfg, run_dir / "config.yaml")

    loader = build_train_loader(cfg, tokenizer, rank, world, local_world_size=launch.local_world_size,
                                run_dir=str(run_dir), local_rank=launch.local_rank)
    loader.worker_init_fn = functools.partial(_worker_ignores_stop_signals, loader.worker_init_fn)
    micro_per_epoch = len(loader)
    per_epoch = cfg.train.steps_per_epoch or max(1, micro_per_epoch // cfg.train.grad_accum_steps)
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch

    model = build_model(cfg, log)
    ds_dir = ckpt.prepare_universal(resume_dir) if universal else resume_dir
    engine, ds, opt_name = initialize(model, cfg, world, total_steps, load_universal=universal)
    module = engine.module
    device = dist_lib.device()
    dtype = engine_dtype(ds)
    ema = MomentumEMA(module, cfg.model.momentum, foreach=cfg.model.foreach_ema)
    pool = cfg.pool_size(world)
    gather = dist_lib.make_pool_gather(pool)
    world_gather = dist_lib.make_gather()
    log(summary(cfg, launch, ds, module, opt_name, total_steps, per_epoch))

    pool_index = rank // pool  # which negatives pool this rank belongs to (its queue file)
    step, epoch = 0, 0
    if resume_dir:
        client = ckpt.load(engine, resume_dir, ds_dir)
        step, epoch = int(client["step"]), int(client["epoch"])
        momentum = ckpt_lib.read(resume_dir / ckpt_lib.MOMENTUM_FILE)
        if universal:
            ema.load_full(assemble_full(momentum, (f["ema_partitions"] for f in ckpt_lib.rank_files(resume_dir))))
            log(f"resumed from {resume_dir} (world {resume_meta['world_size']} -> {world}, universal)")
        else:
            mine = ckpt_lib.read(resume_dir / ckpt_lib.rank_file_name(rank))
            ema.load(momentum, mine["ema_partitions"])
            set_rng_state(mine["rng"])
            log(f"resumed from {resume_dir} at step {step}")
        queues = ckpt_lib.read_queue(resume_dir, pool_index)
        with torch.no_grad():
            for name, value in queues.items():
                getattr(module, name).copy_(value)
        loader.load_state_dict(client["loader"])

    metrics = MetricsLogger(run_dir, is_main, cfg.logging.tensorboard, resume_step=step if resume_dir else None)
    evaluator = None
    if cfg.data.val_dir and (cfg.eval.every_steps or eval_each_epoch):
        from ..eval.evaluator import RetrievalEvaluator
        evaluator = RetrievalEvaluator(cfg, cfg.data.val_dir, tokenizer)
    best = {"r_mean": -1.0}

    def validate():
        values = evaluator(module, device, ds.get("zero_optimization", {}).get("stage", 0))
        metrics.log(step, values, prefix="val")
        log(f"val step {step}: TR@1 {values['txt_r1']:.2f} IR@1 {values['img_r1']:.2f} "
            f"r_mean {values['r_mean']:.2f} (chance TR@1 {values['chance_txt_r1']:.2f})")
        if keep_best and values["r_mean"] > best["r_mean"]:
            best.update(values)
            tag_dir = save()
            if is_main:
                (run_dir / "best.json").write_text(json.dumps({"tag": tag_dir.name, "step": step, **values}))
    running = RunningMeans()
    keys_log = None
    if cfg.logging.log_sample_keys:
        keys_path = run_dir / f"sample_keys_rank{rank}.jsonl"
        if resume_dir:  # lines are written at micro-steps of steps 0..step-1 (done), drop the redone ones
            rewind_jsonl(keys_path, step - 1)
        keys_log = open(keys_path, "a", encoding="utf-8")
    flops_per_pair, peak = _flops_and_peak(cfg, device, dtype)
    bar = None
    if is_main and cfg.logging.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)

    special = dict(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                   cls_token_id=tokenizer.cls_token_id)
    stopped_by_signal = False
    micro = 0
    t_log = time.time()
    pairs_since_log = steps_since_log = 0
    dist_lib.TRAFFIC.take()  # start-up collectives are not a step's
    engine.train()

    queue_names = [n for n in ("image_queue", "text_queue", "queue_ptr", "idx_queue") if hasattr(module, n)]

    def save():
        client = {"step": step, "epoch": epoch, "loader": loader.state_dict()}
        # What this rank writes: its RNG and ZeRO-3 partitions; the whole-tensor momentum
        # master once (rank 0); its pool's queues once (the pool's first rank).
        files = {ckpt_lib.rank_file_name(rank): {"rng": rng_state(), "ema_partitions": ema.partition_state()}}
        if rank == 0:
            files[ckpt_lib.MOMENTUM_FILE] = ema.full_state()
        if rank % pool == 0:
            files[ckpt_lib.queue_file_name(pool_index)] = {n: getattr(module, n).detach().cpu() for n in queue_names}
        meta = {"zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "pools": world // pool,
                **ckpt_lib.run_record(cfg, world)}
        return ckpt.save(engine, step, client, files, meta)

    try:
        while step < total_steps and not stopped_by_signal:
            for batch in loader:
                images = batch["image"].to(device, dtype=dtype, non_blocking=True)
                ids = batch["text_ids"].to(device, non_blocking=True)
                mask = batch["text_mask"].to(device, non_blocking=True)
                image_ids = batch["image_id"].to(device, non_blocking=True)
                seed = step_seed(cfg.train.seed, step, micro, rank)
                # Dropout draws from the global RNG: reseeding it per micro-step makes every draw a
                # function of (seed, step, micro-step, rank), whatever else consumed the RNG
                # (the data loader's iterator does, at different times in a resumed run).
                torch.manual_seed(seed)
                gen = torch.Generator(device=device).manual_seed(seed + 1)
                mlm_ids, mlm_labels = losses.mask_tokens(ids, cfg.model.vocab_size, probability=cfg.model.mlm_probability,
                                                         generator=gen, **special)
                normalizer = None
                if cfg.train.mlm_global_normalization:
                    count = world_gather.sum((mlm_labels != losses.IGNORE_INDEX).sum().float())
                    normalizer = count.clamp(min=1) / world
                alpha = alpha_at(step, per_epoch, cfg.model.alpha, cfg.train.alpha_ramp_epochs)
                out = engine(images, ids, mask, mlm_ids, mlm_labels, alpha=alpha, image_ids=image_ids,
                             gather=gather, generator=gen, mlm_normalizer=normalizer)
                engine.backward(out["loss"])
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                if keys_log is not None:
                    keys_log.write(json.dumps({"step": step, "micro": micro, "keys": list(batch["key"])}) + "\n")
                running.add({k: out[k] for k in ("loss", "loss_itc", "loss_itm", "loss_mlm",
                                                  "itm_acc", "pos_sim", "neg_sim")})
                pairs_since_log += images.shape[0] * world
                micro += 1
                if not boundary:
                    continue
                ema.update()
                clamp_master(module.temp, *TEMP_BOUNDS)
                step += 1
                steps_since_log += 1
                micro = 0
                if bar is not None:
                    bar.update(1)
                if step % cfg.logging.log_every == 0 or step == total_steps:
                    values = running.read_and_reset()
                    elapsed = max(time.time() - t_log, 1e-9)
                    pairs_s = pairs_since_log / elapsed
                    values.update({
                        "lr": engine.get_lr()[0], "alpha": alpha, "temp": float(module.temp.detach().float()),
                        "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                        "pairs_per_s": pairs_s, "epoch": epoch,
                        "achieved_tflops": pairs_s * flops_per_pair / 1e12,
                    })
                    if peak:
                        values["mfu"] = pairs_s * flops_per_pair / (peak * world)
                    # Bytes this rank received per step through albef-ds's own collectives.
                    traffic = dist_lib.TRAFFIC.take()
                    values["comm_bytes_per_step"] = sum(traffic.values()) / max(1, steps_since_log)
                    for kind, nbytes in traffic.items():
                        values[f"comm_bytes/{kind}"] = nbytes / max(1, steps_since_log)
                    mem = memory_gb(device)
                    if mem is not None:
                        values["memory_gb"] = mem
                    metrics.log(step, values)
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.3f}", itc=f"{values['loss_itc']:.2f}",
                                        itm=f"{values['loss_itm']:.2f}", mlm=f"{values['loss_mlm']:.2f}")
                    t_log, pairs_since_log, steps_since_log = time.time(), 0, 0
                    if keys_log is not None:
                        keys_log.flush()
                # Epochs counted in optimizer steps (train.steps_per_epoch or the data size).
                end_of_epoch = eval_each_epoch and (step % per_epoch == 0 or step == total_steps)
                if evaluator is not None and (end_of_epoch or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)):
                    validate()
                saved = step % cfg.checkpoint.every_steps == 0 or step == total_steps
                if saved:
                    save()
                if step < total_steps and stop.agreed(device):
                    stopped_by_signal = True
                    if not saved:
                        save()
                    log(f"stop requested ({stop.signal_name or 'another rank'}): checkpoint at step {step} committed")
                    break
                if step >= total_steps:
                    break
            else:
                epoch += 1
    except BaseException:
        _end_loader_workers()
        raise
    if keys_log is not None:
        keys_log.close()
    metrics.close()
    if bar is not None:
        bar.close()
    if step >= total_steps and is_main:
        (run_dir / DONE_MARKER).write_text(str(step))
        log(f"done: {step} steps; checkpoints in {ckpt.dir}, metrics in {run_dir / 'metrics.jsonl'}, "
            f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    dist_lib.barrier()
    clean_shared_memory_leftovers(launch)
    if launch.local_rank == 0:
        from ..data import shm
        shm.release(run_dir)
    return EXIT_PREEMPTED if stopped_by_signal else 0
