"""The Objective seam: what one training objective owns, and what the Trainer hands it.

An objective turns a loader batch into model inputs (:meth:`Objective.prepare`: device
transfer, masking, negatives' generator, alpha, normalisers) and computes named losses and
detached diagnostics from the model's components (:meth:`Objective.compute`, run inside
the engine's forward so ZeRO-3 sees one forward per micro-step). The Trainer sums nothing
itself: it backpropagates ``out["loss"]`` and logs the keys the objective declares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """Where the loop stands at one micro-step, and the collectives the objective may use."""
    step: int
    micro: int
    epoch: int
    steps_per_epoch: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    #: a function of (train.seed, step, micro, rank): resumed runs draw what uninterrupted ones did
    seed: int
    generator: torch.Generator
    #: the negatives pool's gather (albef_ds.gather protocol) and the whole world's
    gather: object
    world_gather: object


class Objective:
    #: registry name (albef_ds.objectives.OBJECTIVES)
    name = ""
    #: scalar outputs averaged between log lines (metrics.jsonl, TensorBoard)
    log_keys: tuple = ("loss",)
    #: the few keys shown on the progress bar
    progress_keys: tuple = ("loss",)
    #: config values this objective needs, applied before the model is built
    config_overrides: tuple = ()
    #: where training data comes from: "pairs" (MDS shards, data.train_dirs) or "task"
    #: (annotation JSON, task.train_files: :meth:`make_loader`)
    data = "pairs"
    #: model parts (state-dict key prefixes) this objective neither trains nor reads: a
    #: checkpoint without them (a reference task checkpoint) loads, and they stay as built
    unused_parts: tuple = ()
    #: the reference release's checkpoint layout for this task (albef_ds.weights): the key
    #: prefixes it holds, and whether its text encoder is a BertModel (keys without ``.bert``);
    #: "retrieval": the fine-tuned retrieval model's; (): the pretraining model's
    reference_layout: tuple | str = ()
    reference_text_is_bert_model = False
    #: modules this objective adds (extend_model): a checkpoint holding any of them is one
    #: of this task's, loaded after the heads are added
    head_prefixes: tuple = ()
    #: checkpoint key prefixes dropped when loading one of this task's checkpoints
    ignored_checkpoint_parts: tuple = ()
    #: whether the pretraining step's analytic FLOPs (albef_ds.model_info, the MFU
    #: definition) describe this objective's step: the log line's TFLOP/s and MFU are left
    #: out where they do not (the downstream tasks)
    reports_pretraining_flops = True

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    @classmethod
    def check_settings(cls, cfg, evaluates: bool) -> None:
        """Raise ConfigError (one line naming the key) for a setting this objective needs that
        the config and the files it names already show wrong: called before any model is
        built or run directory locked, so that a missing file is not found minutes later.
        ``evaluates``: whether this objective's evaluation will run (a validation split while
        fine-tuning, ``albef-ds eval``)."""

    def extend_model(self, model) -> None:
        """Add this task's heads (ALBEF.add_head) to the model, before the engine: after a
        pretraining checkpoint loaded (heads built from it may copy its layers), before a
        checkpoint of this task loads. Pretraining adds none."""

    def holds_heads(self, state_dict: dict) -> bool:
        """Whether these weights hold this task's heads (trained ones: nothing else saves them)."""
        return any(k.split(".")[0] in self.head_prefixes for k in state_dict)

    def is_task_checkpoint(self, state_dict: dict) -> bool:
        """Whether these weights come from this task (they hold its heads)."""
        return self.holds_heads(state_dict)

    def make_loader(self, cfg, rank: int, world: int, local_world: int, local_rank: int, run_dir: str):
        """The training loader: any iterable of batch dicts with ``__len__``, ``state_dict``,
        ``load_state_dict`` and a settable ``worker_init_fn``. Batches hold ``image`` (first
        dimension: pairs) and ``key`` (one str per pair). Default: the MDS pair loader."""
        from ..data import build_train_loader
        return build_train_loader(cfg, self.tokenizer, rank, world, local_world_size=local_world,
                                  run_dir=run_dir, local_rank=local_rank)

    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        """Keyword arguments of :meth:`compute` for this micro-batch."""
        raise NotImplementedError

    def compute(self, model, **inputs) -> dict:
        """``{"loss": scalar with grad, <log key>: detached scalar, ...}``."""
        raise NotImplementedError

    def make_evaluator(self, cfg, tokenizer):
        """The evaluation run during training (None: none): a callable ``(model, device) ->
        metrics`` with ``primary`` (the metric the best checkpoint is kept by) and
        ``headline(metrics) -> str``. Tasks: :meth:`evaluator_for` on task.val_file;
        otherwise retrieval on data.val_dir."""
        if self.data == "task":
            return self.evaluator_for(cfg.task.val_file) if cfg.task.val_file else None
        if not cfg.data.val_dir:
            return None
        from ..eval.evaluator import RetrievalEvaluator
        return RetrievalEvaluator(cfg, cfg.data.val_dir, tokenizer)

    def evaluator_for(self, path: str, log=print):
        """A task's evaluator on one annotation file (``albef-ds eval`` calls it too)."""
        raise NotImplementedError(f"objective {self.name!r} has no task evaluation")


def alpha_at(step: int, steps_per_epoch: int, alpha: float, ramp_epochs: float) -> float:
    """Distillation weight: linear from 0 to ``alpha`` over the first ``ramp_epochs``."""
    ramp = ramp_epochs * steps_per_epoch
    if ramp <= 0:
        return alpha
    return alpha * min(1.0, step / ramp)


def images_and_texts(batch: dict, ctx: StepContext) -> dict:
    """The pair batch on the device: images in the engine's dtype."""
    return {"images": batch["image"].to(ctx.device, dtype=ctx.dtype, non_blocking=True),
            "text_ids": batch["text_ids"].to(ctx.device, non_blocking=True),
            "text_mask": batch["text_mask"].to(ctx.device, non_blocking=True),
            "image_ids": batch["image_id"].to(ctx.device, non_blocking=True)}
