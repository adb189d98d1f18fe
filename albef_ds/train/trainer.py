"""The Trainer: one loop for every objective (albef_ds.objectives).

It owns resume, the micro-step (prepare -> engine forward -> backward -> step),
gradient accumulation, the fp32 momentum EMA, logging, evaluation, checkpoints and the
stop on a signal. :meth:`Trainer.train_step` is the unit ``albef-ds bench`` times.

Launch-agnostic: the launch environment (albef_ds.distributed.LaunchEnv) is passed in.
Per micro-step the global RNG and the objective's generator are seeded by (seed, step,
micro-step, rank), so a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch

from .. import distributed as dist_lib
from .. import threads as threads_lib
from ..config import Config, ConfigError, save_config
from ..objectives import Objective, StepContext
from ..objectives.pretrain import TEMP_BOUNDS
from ..errors import UsageError
from . import checkpoint as ckpt_lib
from . import fast_paths
from . import run_dir as run_dir_lib
from .engines import engine_class
from .ema import MomentumEMA, assemble_full
from .metrics import MetricsLogger, RunningMeans, format_log_line, memory_gb, rewind_jsonl
from .stop import EXIT_PREEMPTED, StopCheck, StopFlag, end_loader_workers, worker_ignores_stop_signals
from .watchdog import JobWatchdog, process_group_store

#: marker written in the run directory when the planned final step is reached.
DONE_MARKER = "DONE"


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63 - 1)


def build_model(cfg: Config, log=print, objective: Objective | None = None, trained_heads: bool = False):
    """ALBEF with the objective's task heads and the configured initial weights (each
    loader reports what it did). ``trained_heads`` (evaluation): the heads must come from
    ``checkpoint.init_from``; weights without them are refused (UsageError), since a fresh
    head's score means nothing.

    A checkpoint of the task itself (its heads present: the reference's fine-tuned VE,
    NLVR2 or VQA model, or an export of ours) loads after the heads are added; any other
    (pretraining) checkpoint loads first, and the heads are then built from it (NLVR2's
    two-image fusion layers and VQA's decoder copy pretrained layers) or start fresh.
    """
    from ..models import ALBEF
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ALBEF(cfg.model)
    c = cfg.checkpoint
    from .. import weights
    state = source = None
    if c.init_from:
        from .export import check_text_form, read_init, recorded_text_form
        state, source, record = read_init(c.init_from)  # a weights file, or a checkpoint folder
        # trained on this run's text form?
        check_text_form(*recorded_text_form(c.init_from, record.get(weights.TEXT_FORM_KEY)), cfg)
    task_checkpoint = objective is not None and state is not None and objective.is_task_checkpoint(state)
    has_heads = objective is not None and state is not None and objective.holds_heads(state)
    if trained_heads and objective is not None and objective.head_prefixes and not has_heads:
        raise UsageError(
            f"{c.init_from or 'checkpoint.init_from (unset)'}: no trained {objective.name} head in it "
            f"({', '.join(objective.head_prefixes)}): a fresh head's score would mean nothing. Fine-tune it "
            f"first: albef-ds finetune --task {objective.name} --init {c.init_from or 'MODEL'} ...")

    def load(optional: tuple = (), ignore: tuple = ()) -> None:
        # A checkpoint without momentum copies (the reference's NLVR2 text-assignment
        # stage): they start as copies of the weights it does hold.
        no_momentum = not any(k.split(".")[0].endswith("_m") for k in state)
        momentum = tuple(m for _, m in model.momentum_pairs) if no_momentum else ()
        report = weights.load_albef_checkpoint(model, state, source=source, optional=optional + momentum,
                                               ignore=ignore, allow_missing=c.allow_partial,
                                               hint="checkpoint.allow_partial=true loads it, those tensors fresh")
        log(str(report))
        if c.allow_partial:  # every one named, not the report's folded list
            log(f"checkpoint.allow_partial: {len(report.missing)} tensor(s) missing from the checkpoint started "
                f"fresh: {', '.join(report.missing) or 'none'}")
        if no_momentum:
            model.copy_params_to_momentum()
            log("note: the checkpoint holds no momentum copies: they start as copies of the online weights")

    if state is not None and not task_checkpoint:
        load()
    if objective is not None:
        objective.extend_model(model)
    if task_checkpoint:
        # Strict: only what the reference's task checkpoints never hold may be missing (the
        # objective's unused_parts); a checkpoint holding none of the task's heads (NLVR2's
        # text-assignment stage: the two-image encoder, no classifier) starts them fresh.
        load(optional=tuple(objective.unused_parts) + (() if has_heads else tuple(model.task_heads)),
             ignore=tuple(objective.ignored_checkpoint_parts))
    if c.bert_init:
        log(str(weights.load_hf_bert(model, c.bert_init)))
    if c.vit_init:
        log(str(weights.load_vit_state_dict(model, c.vit_init)))
    return model


class Trainer:
    """The model on its engine, the EMA, the negatives' gathers and the step counters.
    ``objective``: an :class:`~albef_ds.objectives.Objective` instance."""

    def __init__(self, cfg: Config, launch, objective: Objective, total_steps: int, steps_per_epoch: int,
                 load_universal: bool = False, log=print):
        self.cfg, self.launch, self.objective, self.log = cfg, launch, objective, log
        self.rank, self.world = launch.rank, launch.world_size
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        model = fast_paths.apply(build_model(cfg, log, objective), cfg, log)
        self.engine = engine_class(cfg.distributed.engine)(model, cfg, self.world, total_steps, load_universal)
        self.module = self.engine.module
        self.device = dist_lib.device()
        # Pure data parallelism: the data-parallel rank is the global rank.
        self.ema = MomentumEMA(self.module, cfg.model.momentum, dp_rank=self.rank, foreach=cfg.model.foreach_ema,
                               views=self.engine)
        self.pool = cfg.pool_size(self.world)
        self.pool_index = self.rank // self.pool  # which negatives pool (and queue file) this rank has
        self.gather = dist_lib.make_pool_gather(self.pool)
        self.world_gather = dist_lib.make_gather()
        self.step = self.micro = self.epoch = 0
        self.running = RunningMeans()
        self.engine.train()

    def context(self) -> StepContext:
        seed = step_seed(self.cfg.train.seed, self.step, self.micro, self.rank)
        return StepContext(self.step, self.micro, self.epoch, self.steps_per_epoch, self.rank, self.world,
                           self.device, self.engine.dtype, seed,
                           torch.Generator(device=self.device).manual_seed(seed + 1),
                           self.gather, self.world_gather)

    def train_step(self, batch: dict) -> tuple[dict, bool]:
        """One micro-step; returns the objective's outputs and whether an optimizer step
        (and the EMA's move) happened."""
        ctx = self.context()
        # Dropout draws from the global RNG: reseeding it per micro-step makes every draw a
        # function of (seed, step, micro-step, rank), whatever else consumed the RNG.
        torch.manual_seed(ctx.seed)
        inputs = self.objective.prepare(batch, ctx)
        with fast_paths.fp8_autocast(self.cfg.model.fp8):
            out = self.engine.forward(self.objective.compute, **inputs)
        self.engine.backward(out["loss"])
        boundary = self.engine.step()
        self.running.add({k: out[k] for k in self.objective.log_keys})
        self.micro += 1
        if boundary:
            self.ema.update()
            self.engine.clamp_master(self.module.temp, *TEMP_BOUNDS)
            self.step += 1
            self.micro = 0
        return out, boundary

    def step_values(self, elapsed: float, pairs: int, steps: int) -> dict:
        """What a log line holds: the objective's means since the last line, the schedule,
        throughput, and the bytes this rank received per step through our collectives."""
        values = self.running.read_and_reset()
        values.update({"lr": self.engine.lr(), "temp": self.engine.scalar(self.module.temp),
                       "grad_norm": self.engine.grad_norm(), "pairs_per_s": pairs / max(elapsed, 1e-9),
                       "epoch": self.epoch})
        traffic = dist_lib.TRAFFIC.take()
        values["comm_bytes_per_step"] = sum(traffic.values()) / max(1, steps)
        for kind, nbytes in traffic.items():
            values[f"comm_bytes/{kind}"] = nbytes / max(1, steps)
        mem = memory_gb(self.device)
        if mem is not None:
            values["memory_gb"] = mem
        return values

    # ------------------------------------------------------------------ checkpoints
    def queue_state(self) -> dict:
        return {n: getattr(self.module, n).detach().cpu() for n in ckpt_lib.QUEUE_BUFFERS if hasattr(self.module, n)}

    def save(self, ckpt: "ckpt_lib.CheckpointManager", loader) -> Path:
        client = {"step": self.step, "epoch": self.epoch, "loader": loader.state_dict()}
        # What this rank writes: its RNG and ZeRO-3 partitions; the whole-tensor momentum
        # master once (rank 0); its pool's queues once (the pool's first rank).
        files = {ckpt_lib.rank_file_name(self.rank): {"rng": ckpt_lib.rng_state(),
                                                      "ema_partitions": self.ema.partition_state()}}
        if self.rank == 0:
            files[ckpt_lib.MOMENTUM_FILE] = self.ema.full_state()
        if self.rank % self.pool == 0:
            files[ckpt_lib.queue_file_name(self.pool_index)] = self.queue_state()
        meta = {"engine": self.engine.name, **self.engine.meta(),
                "pools": self.world // self.pool, "momentum_layout": self.ema.layout(),
                **ckpt_lib.run_record(self.cfg, self.world, self.objective.tokenizer)}
        return ckpt.save(self.engine, self.step, client, files, meta)

    def resume(self, ckpt, tag_dir: Path, ds_dir: Path, saved_world: int, loader) -> None:
        """Load every piece of the checkpoint, then write this config's optimizer settings
        and schedule over the saved ones (albef_ds.train.resume_settings says which
        changes a resume applies)."""
        client = ckpt.load(self.engine, tag_dir, ds_dir)
        self.step, self.epoch = int(client["step"]), int(client["epoch"])
        momentum = ckpt_lib.read(tag_dir / ckpt_lib.MOMENTUM_FILE)
        if saved_world != self.world:
            self.ema.load_full(assemble_full(momentum, ckpt_lib.momentum_partitions(tag_dir)))
            how = "universal" if self.engine.convert_for_world is not None else "resharded on load"
            self.log(f"resumed from {tag_dir} (world {saved_world} -> {self.world}, {how})")
        else:
            mine = ckpt_lib.read(tag_dir / ckpt_lib.rank_file_name(self.rank))
            self.ema.load(momentum, mine["ema_partitions"])
            ckpt_lib.set_rng_state(mine["rng"])
            self.log(f"resumed from {tag_dir} at step {self.step}")
        with torch.no_grad():
            for name, value in ckpt_lib.read_queue(tag_dir, self.pool_index).items():
                getattr(self.module, name).copy_(value)
        loader.load_state_dict(client["loader"])
        self.engine.apply_settings(self.cfg, self.total_steps)


def check_data(cfg: Config, evaluates: bool = False) -> None:
    """The training data the configured objective reads, and the tokenizer, exist; the
    objective's own settings hold (``evaluates``: its evaluation will run). Before any model
    is built or run directory locked."""
    from ..objectives import objective_class
    engine_class(cfg.distributed.engine)  # an unknown engine: refused here, naming the key and the choices
    cls = objective_class(cfg.train.objective)
    if cls.data == "task":
        check_task_files(cfg)
    else:
        check_data_dirs(cfg)
    cls.check_settings(cfg, evaluates)


def check_task_files(cfg: Config) -> None:
    t = cfg.task
    if not t.train_files:
        raise ConfigError("config key 'task.train_files': no training annotation given "
                          "(e.g. --set task.train_files=[data/ve_train.json])")
    for key, paths in (("task.train_files", t.train_files), ("task.val_file", [t.val_file] if t.val_file else [])):
        for path in paths:
            if not Path(path).is_file():
                raise ConfigError(f"config key '{key}': annotation file not found: {path}")
    if t.image_root and not Path(t.image_root).is_dir():
        raise ConfigError(f"config key 'task.image_root': folder not found: {t.image_root}")
    _check_tokenizer(cfg)


def check_data_dirs(cfg: Config) -> None:
    if not cfg.data.train_dirs:
        raise ConfigError("config key 'data.train_dirs': no training data given "
                          "(e.g. --set data.train_dirs=[/data/synth/train])")
    for d in cfg.data.train_dirs:
        if "://" not in d and not Path(d).is_dir():
            raise ConfigError(f"config key 'data.train_dirs': data directory not found: {d}")
    _check_tokenizer(cfg)


def _check_tokenizer(cfg: Config) -> None:
    if not cfg.data.tokenizer:
        raise ConfigError("config key 'data.tokenizer': a tokenizer folder is required "
                          "(albef-data build-vocab, or a local bert-base-uncased folder)")
    if not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"config key 'data.tokenizer': tokenizer folder not found: {cfg.data.tokenizer}")


def resume_note(tag_dir: Path, step: int, applied: list[str]) -> str | None:
    """What a resume does with each setting that differs from the checkpoint's config."""
    if not applied:
        return None
    return "\n".join([f"note: the config differs from the checkpoint's ({tag_dir}) in {len(applied)} key(s); "
                      f"from step {step + 1} on:"] + [f"  {line}" for line in applied])


def summary(cfg: Config, launch, trainer: Trainer, threads=None) -> str:
    module, engine = trainer.module, trainer.engine
    trainable = sum(engine.full_numel(p) for p in module.parameters() if p.requires_grad)
    frozen = sum(engine.full_numel(p) for p in module.parameters() if not p.requires_grad)
    pool = trainer.pool
    return "\n".join([
        f"albef-ds train (objective {trainer.objective.name})",
        f"  world size {launch.world_size} on {launch.num_nodes} node(s) ({launch.launcher}); "
        f"{engine.describe()}",
        f"  parameters: {trainable:,} trainable, {frozen:,} momentum (frozen)",
        f"  batch: micro {cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum_steps} x "
        f"world {launch.world_size} = global {cfg.global_batch(launch.world_size)}",
        f"  steps: {trainer.total_steps} ({trainer.steps_per_epoch} per epoch); queue {cfg.model.queue_size}; "
        f"ITC candidates {cfg.model.itc_candidates}; ITM negatives {cfg.model.itm_negatives} "
        f"({cfg.model.itm_exchange}); negatives pool {pool} rank(s) = "
        f"{pool * cfg.train.micro_batch_size} pairs per micro-step",
        f"  data: {', '.join(cfg.data.train_dirs if trainer.objective.data == 'pairs' else cfg.task.train_files)} "
        f"(tokenizer {cfg.data.tokenizer})",
        f"  run dir: {cfg.logging.run_dir}",
    ] + ([f"  threads: {threads.threads} per rank ({threads.why})"] if threads else []))


def _flops_and_peak(cfg: Config, device: torch.device, dtype: torch.dtype) -> tuple[float, float | None]:
    """Analytic FLOPs per pair (the project's MFU definition) and the device's dense peak."""
    from ..model_info import analytic_flops, device_peak_flops
    flops = analytic_flops(cfg, cfg.data.max_tokens)["total"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return flops, device_peak_flops(name, str(dtype).replace("torch.", ""))


def make_objective(cfg: Config, tokenizer) -> Objective:
    """The configured objective, its config needs applied (before any model is built)."""
    from ..config import apply_overrides
    from ..objectives import objective_class
    cls = objective_class(cfg.train.objective)
    apply_overrides(cfg, cls.config_overrides, f"objective {cls.name}")
    return cls(cfg, tokenizer)


def train(cfg: Config, launch, resume: str, eval_each_epoch: bool = False, keep_best: bool = False,
          stop: StopFlag | None = None, overwrite: bool = False) -> int:
    """Train ``cfg.train.objective``; returns 0 at the final step, EXIT_PREEMPTED after a
    stop on a signal. ``eval_each_epoch``/``eval.every_steps``: the objective's evaluation
    on data.val_dir (metrics prefix ``val``); ``keep_best``: the checkpoint with the best
    val metric (the evaluator's ``primary``: itm_r_mean for retrieval, accuracy for the
    classification tasks) is kept (``best.json``) whatever ``keep_last`` says.

    The run directory holds this run only: rank 0 locks it for the run's life (a second
    start is refused), and ``resume="none"`` into a directory holding an earlier run's
    outputs is refused unless ``overwrite`` (which removes them first).

    A failure on any rank ends every rank within seconds (:class:`JobWatchdog`), each
    releasing its loader workers and shared memory on the way out."""
    stop = stop or StopFlag()
    check = StopCheck(stop, cfg.train.stop_check_every, cfg.train.stop_check_async)
    run_dir_lib.absolute_paths(cfg)  # the saved config must work from any directory
    release = functools.partial(release_local_resources, cfg.logging.run_dir, launch, cfg.distributed.engine)
    watchdog = JobWatchdog(process_group_store(), launch.rank, launch.world_size, on_exit=release).start()
    lock = None
    try:
        lock = _claim_run_dir(cfg, launch, resume, overwrite)
        run = _Run(cfg, launch, resume, eval_each_epoch, keep_best)
        trainer, loader = run.trainer, run.loader
        empty_epochs = 0  # one is a resume at an epoch's very end; two in a row would spin forever
        while trainer.step < trainer.total_steps and not run.stopped:
            batches = 0
            for batch in loader:
                batches += 1
                out, boundary = trainer.train_step(batch)
                run.after_micro_step(batch, out)
                if boundary and (run.after_step(check) or trainer.step >= trainer.total_steps):
                    break
            else:
                empty_epochs = empty_epochs + 1 if batches == 0 else 0
                if empty_epochs == 2:  # (a dataset that fills no batch is refused at start-up)
                    raise RuntimeError(f"epochs {trainer.epoch - 1} and {trainer.epoch} of the training data "
                                       f"gave this rank no batch")
                trainer.epoch += 1
        check.drain()  # a reduce started at the last check step is waited for
        return run.finish(watchdog)
    except BaseException as e:
        watchdog.fail(" ".join(f"{type(e).__name__}: {e}".split())[:1000])
        release()
        raise
    finally:
        watchdog.stop()
        if lock is not None:
            lock.release()


def _refuse_an_epoch_without_a_batch(loader, cfg: Config, world: int) -> None:
    """Batches are whole (drop_last): a dataset smaller than one global micro-batch gives each
    rank no batch, and every epoch would end at once without a step."""
    if len(loader) > 0:
        return
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    pairs = getattr(getattr(loader, "dataset", None), "num_samples", None)
    fits = pairs // world if pairs else 0
    change = (f"lower train.micro_batch_size to {fits} or less (--set train.micro_batch_size={fits}), "
              if fits else "") + "run fewer ranks, or add pairs"
    raise UsageError(
        f"{pairs if pairs is not None else 'the'} training pairs in {', '.join(map(str, cfg.data.train_dirs))} "
        f"fill no batch: one micro-batch on every rank takes train.micro_batch_size {micro} x {world} rank(s) "
        f"= {micro * world} pairs (the global batch, with train.grad_accum_steps {accum}, is "
        f"{micro * accum * world}); {change}")


def release_local_resources(run_dir: str, launch, engine: str = "deepspeed") -> None:
    """What a rank that ends abnormally must give back: its loader workers (they ignore
    SIGTERM), what its engine leaves on the host (DeepSpeed: an all-reduce buffer in
    /dev/shm), and (the node's local leader)
    the streaming shared memory and lock files of this job. Best effort, never raises."""
    for release in (end_loader_workers, lambda: engine_class(engine).release_local(launch)):
        try:
            release()
        except Exception:
            pass
    if launch.local_rank == 0:
        try:
            from ..data import shm
            shm.release(run_dir, failed=True)
        except Exception:
            pass


def _claim_run_dir(cfg: Config, launch, resume: str, overwrite: bool):
    """Rank 0 locks the run directory and, for a fresh start, checks (or with
    ``overwrite`` clears) what an earlier run left there; every rank raises the same error
    when either fails (before anything else is written). Returns rank 0's lock."""
    lock, error = None, None
    if launch.rank == 0:
        try:
            lock = run_dir_lib.RunDirLock(cfg.logging.run_dir).acquire()
            if resume == "none":
                run_dir_lib.prepare_fresh_start(cfg.logging.run_dir, overwrite)
        except UsageError as e:
            error = str(e)
        except OSError as e:  # e.g. ENOSYS: a file system without flock (Lustre mounted without -o flock)
            error = run_dir_lib.lock_error(cfg.logging.run_dir, e)
    error = dist_lib.broadcast_object(error)
    if error:
        if lock is not None:
            lock.release()
        raise UsageError(error)
    return lock


class _Run:
    """Everything around the Trainer that one training run writes: the run directory,
    checkpoints, metrics, sample keys, the progress bar, evaluations."""

    def __init__(self, cfg: Config, launch, resume: str, eval_each_epoch: bool, keep_best: bool):
        from ..tokenizer import load_tokenizer
        self.cfg, self.launch, self.keep_best, self.eval_each_epoch = cfg, launch, keep_best, eval_each_epoch
        self.resume = resume
        self.threads = threads_lib.apply(launch.local_world_size, cfg.data.num_workers)
        is_main = launch.rank == 0
        self.log = log = print if is_main else (lambda *a, **k: None)
        self.run_dir = run_dir = Path(cfg.logging.run_dir)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if len(tokenizer) != cfg.model.vocab_size:
            log(f"note: model.vocab_size {cfg.model.vocab_size} -> {len(tokenizer)} (the tokenizer's)")
            cfg.model.vocab_size = len(tokenizer)
        objective = make_objective(cfg, tokenizer)

        self.ckpt = ckpt_lib.CheckpointManager(run_dir, cfg.checkpoint.keep_last, launch.rank, launch.world_size,
                                               log=log)
        # Verified (and every change of setting checked) before anything is written.
        resume_dir, record = self.ckpt.resolve_with_record(resume)
        applied = ckpt_lib.check_resumable(resume_dir, record, cfg, launch.world_size, tokenizer) if record else []
        universal = record is not None and record["world_size"] != launch.world_size

        self.loader = objective.make_loader(cfg, launch.rank, launch.world_size, launch.local_world_size,
                                            launch.local_rank, str(run_dir))
        self.loader.worker_init_fn = functools.partial(worker_ignores_stop_signals, self.loader.worker_init_fn)
        _refuse_an_epoch_without_a_batch(self.loader, cfg, launch.world_size)
        per_epoch = cfg.train.steps_per_epoch or max(1, len(self.loader) // cfg.train.grad_accum_steps)
        total = cfg.train.max_steps or cfg.train.epochs * per_epoch
        ds_dir = self.ckpt.prepare_universal(resume_dir, record) if universal else resume_dir
        self.trainer = t = Trainer(cfg, launch, objective, total, per_epoch, load_universal=universal, log=log)
        log(summary(cfg, launch, t, self.threads))
        if resume_dir:
            note = resume_note(resume_dir, int(record["step"]), applied)
            if note:
                log(note)
            t.resume(self.ckpt, resume_dir, ds_dir, record["world_size"], self.loader)
            dist_lib.barrier()  # the checkpoint loaded on every rank: only now is the run directory written
        if is_main:
            save_config(cfg, run_dir / "config.yaml")

        # A start without a checkpoint (--resume auto before the first save was made)
        # redoes every step: earlier lines of this directory are dropped too.
        self.metrics = MetricsLogger(run_dir, is_main, cfg.logging.tensorboard, resume_step=t.step)
        if resume_dir:
            self.metrics.mark_resume(t.step, resume_dir, launch.world_size)
        self.evaluator = (objective.make_evaluator(cfg, tokenizer)
                          if cfg.eval.every_steps or eval_each_epoch else None)
        self.best = -1.0
        self.keys_log = None
        if cfg.logging.log_sample_keys:
            keys_path = run_dir / f"sample_keys_rank{launch.rank}.jsonl"
            # lines are written at micro-steps of steps 0..step-1 (done): drop the redone ones
            rewind_jsonl(keys_path, t.step - 1)
            self.keys_log = open(keys_path, "a", encoding="utf-8")
        self.flops_per_pair, self.peak = _flops_and_peak(cfg, t.device, t.engine.dtype)
        self.bar = None
        # tqdm draws on stderr with '\r': into a file (a SLURM log) that is one endless line,
        # so the bar is only drawn on a terminal; the plain log lines are printed either way.
        if is_main and cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=t.step, desc=objective.name, unit="step", dynamic_ncols=True)
        self.stopped = False
        self.stop_flag = None  # the StopFlag the run stopped on (its first signal is named at the end)
        self.t_log, self.pairs_since_log, self.steps_since_log = time.time(), 0, 0
        self.t_start, self.step_start = self.t_log, t.step  # for the ETA
        dist_lib.TRAFFIC.take()  # start-up collectives are not a step's

    def after_micro_step(self, batch: dict, out: dict) -> None:
        t = self.trainer
        if self.keys_log is not None:  # the micro-step just taken (its counters have moved on)
            step, micro = (t.step - 1, self.cfg.train.grad_accum_steps - 1) if t.micro == 0 else (t.step, t.micro - 1)
            self.keys_log.write(json.dumps({"step": step, "micro": micro, "keys": list(batch["key"])}) + "\n")
        self.pairs_since_log += batch["image"].shape[0] * t.world

    def after_step(self, stop: StopCheck) -> bool:
        """Log, evaluate, save, and agree on a stop; True when the run stops here."""
        t, cfg = self.trainer, self.cfg
        self.steps_since_log += 1
        if self.bar is not None:
            self.bar.update(1)
        if t.step % cfg.logging.log_every == 0 or t.step == t.total_steps:
            self._log_line()
        end_of_epoch = self.eval_each_epoch and (t.step % t.steps_per_epoch == 0 or t.step == t.total_steps)
        if self.evaluator is not None and (end_of_epoch or (cfg.eval.every_steps and t.step % cfg.eval.every_steps == 0)):
            self._validate()
        saved = t.step % cfg.checkpoint.every_steps == 0 or t.step == t.total_steps
        if saved:
            t.save(self.ckpt, self.loader)
        if t.step < t.total_steps and stop(t.step, t.device):
            self.stopped, self.stop_flag = True, stop.flag
            if not saved:
                t.save(self.ckpt, self.loader)
        return self.stopped

    def stop_line(self) -> str:
        """The last line of a run stopped by a signal: which signal (the first this rank
        received; "another rank" when only another did), the committed step, how to resume."""
        flag = self.stop_flag
        how = ("rerun the same command to resume" if self.resume == "auto" else
               "rerun it with --resume auto (and without --overwrite) to resume")
        return (f"stop requested ({getattr(flag, 'signal_name', None) or 'another rank'}): checkpoint at step "
                f"{self.trainer.step} committed; {how}")

    def _log_line(self) -> None:
        t = self.trainer
        values = t.step_values(time.time() - self.t_log, self.pairs_since_log, self.steps_since_log)
        if t.objective.reports_pretraining_flops:
            values["achieved_tflops"] = values["pairs_per_s"] * self.flops_per_pair / 1e12
            if self.peak:
                values["mfu"] = values["pairs_per_s"] * self.flops_per_pair / (self.peak * t.world)
        self.metrics.log(t.step, values)
        done = t.step - self.step_start
        eta = (time.time() - self.t_start) / done * (t.total_steps - t.step) if done > 0 else None
        line = format_log_line(t.step, t.total_steps, values, t.objective.progress_keys, eta,
                               memory_kind="peak allocated" if t.device.type == "cuda" else "peak RSS")
        if self.bar is not None:
            self.bar.set_postfix({k.replace("loss_", ""): f"{values[k]:.3f}" for k in t.objective.progress_keys})
            self.bar.write(line)
        elif t.rank == 0:
            print(line, flush=True)
        self.t_log, self.pairs_since_log, self.steps_since_log = time.time(), 0, 0
        if self.keys_log is not None:
            self.keys_log.flush()

    def _validate(self) -> None:
        t = self.trainer
        with t.engine.gathered_parameters():
            values = self.evaluator(t.module, t.device)
        self.metrics.log(t.step, values, prefix="val")
        self.log(f"val step {t.step}: {self.evaluator.headline(values)}")
        if self.keep_best and values[self.evaluator.primary] > self.best:
            self.best = values[self.evaluator.primary]
            tag_dir = t.save(self.ckpt, self.loader)
            if t.rank == 0:
                # atomic: every later save's pruning reads it
                ckpt_lib.atomic_write(self.run_dir / "best.json",
                                      json.dumps({"tag": tag_dir.name, "step": t.step, **values}), durable=True)

    def finish(self, watchdog: JobWatchdog | None = None) -> int:
        t = self.trainer
        if self.keys_log is not None:
            self.keys_log.close()
        self.metrics.close()
        if self.bar is not None:
            self.bar.close()
        if t.step >= t.total_steps and t.rank == 0:
            (self.run_dir / DONE_MARKER).write_text(str(t.step))
            board = (f", TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}"
                     if self.trainer.cfg.logging.tensorboard else "")  # none written: none named
            self.log(f"done: {t.step} steps; checkpoints in {self.ckpt.dir}, metrics in "
                     f"{self.run_dir / 'metrics.jsonl'}{board}")
        if watchdog is not None:
            watchdog.stop()  # before the last barrier: after it rank 0 may exit, taking the store along
        dist_lib.barrier()
        t.engine.release_local(self.launch)
        if self.launch.local_rank == 0:
            from ..data import shm
            shm.release(self.run_dir)
        if self.stopped:  # the last line the rank prints: after everything, and after a launcher's traceback
            if hasattr(self.stop_flag, "wait_out_launcher_traceback"):
                self.stop_flag.wait_out_launcher_traceback(self.launch.launcher)
            self.log(self.stop_line(), flush=True)
        return EXIT_PREEMPTED if self.stopped else 0
