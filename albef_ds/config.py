"""One typed configuration for every albef-ds program.

A run is described by a YAML file under ``configs/`` whose top-level sections map onto
the dataclasses below, plus dotted command-line overrides (``--set model.queue_size=4096``).
Every value is type-checked and cross-checked here, before any model is built, and the
error names the key (and the file it came from) so a typo never silently falls back to a
default.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError  # noqa: F401  (raised here; the CLI and tests import it from here)

@dataclass
class ModelConfig:
    # Image encoder (timm VisionTransformer). ViT-B/16 by default (ALBEF_FACTS.md).
    image_res: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    #: initial ViT position embedding: "normal" (timm's, std 0.02: DeiT's, overwritten by
    #: loaded weights) or "sincos" (MAE's fixed 2-D sine-cosine table, then trained). From
    #: random init the tiny ViT needs ~1,500 steps before "which colour is on the left" is
    #: readable at all with std 0.02, ~400 with the table, trained supervised
    #: (docs/benchmarks.md, "Binding: what the tiny model binds").
    vision_pos_init: str = "normal"
    # BERT text + fusion encoder (bert-base-uncased sizes).
    vocab_size: int = 30522
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    #: layers [0, fusion_layer) are the text encoder; [fusion_layer, text_depth) fuse.
    fusion_layer: int = 6
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # Heads and contrastive learning.
    embed_dim: int = 256
    #: momentum features kept as extra ITC negatives; 0: none (the "no queue" ablation).
    queue_size: int = 65536
    momentum: float = 0.995
    temp: float = 0.07
    #: final momentum-distillation weight (ramped from 0, see TrainConfig.alpha_ramp_epochs)
    alpha: float = 0.4
    mlm_probability: float = 0.15
    #: the ranks that share in-batch ITC candidates, ITM negatives and queue contents:
    #: "world" (every rank) or a number of consecutive ranks (a node's ranks first), so the
    #: objective stays that of the recipe however many GPUs run it: with 8, a 512-GPU job is
    #: 64 pools of the paper's 512 pairs, each with its own queue. Must divide the world size;
    #: larger than the world: the whole world (a 1-rank test of an 8-rank preset).
    negative_pool: str = "world"
    #: "pool": in-batch ITC candidates are the momentum features of the pool's batch;
    #: "local": the reference's behaviour (this rank's batch only; the queue is filled over
    #: the pool either way, as the reference fills it over every rank). "global": old name of "pool".
    itc_candidates: str = "pool"
    #: where ITM hard negatives come from: "local" (reference) or "pool" ("global": old name).
    itm_negatives: str = "pool"
    #: how pooled ITM negatives travel: "rows" (each rank receives the image embeddings it
    #: drew, gradients go back to their owners: bytes constant in the pool size) or
    #: "gather" (every rank's embeddings all-gathered with gradient: O(pool) bytes).
    itm_exchange: str = "rows"
    #: fraction of ITM negatives drawn uniformly from the valid candidates instead of by
    #: similarity (0: the paper's hard negatives only). From random init the fusion encoder
    #: does not leave the "no match" prior on hard negatives alone; easy ones get it out
    #: (docs/benchmarks.md, "Why ITM did not learn"). The demo recipe sets 0.5.
    itm_random_negatives: float = 0.0
    #: > 0: ``itm_random_negatives`` applies for this many optimizer steps only, hard
    #: negatives after (easy negatives to leave the prior, hard ones to learn binding).
    itm_random_negatives_steps: int = 0
    #: share of rows whose negative text is replaced by the row's own caption with two
    #: words of one :attr:`itm_swap_words` group swapped ("a red circle left of a blue
    #: square" -> "a blue circle left of a red square"), where the caption holds two
    #: different words of a group: a negative only a model that binds words to image regions
    #: rejects (the compositional test's distractors; NegCLIP's idea, applied to ITM).
    itm_swap_negatives: float = 0.0
    #: groups of interchangeable words (each one token of the tokenizer), e.g. colours and
    #: shape names; the demo sets the synth vocabulary's
    itm_swap_words: list = field(default_factory=list)
    #: ITC positives are every candidate of the same image id, ids kept in a queue too
    #: (retrieval fine-tuning); False: the diagonal only (pretraining).
    itc_id_positives: bool = False
    #: text feature for ITC: "cls" (the paper: the [CLS] hidden state) or "mean" (mean of
    #: the caption's token states). A [CLS] trained from random init with momentum targets
    #: sits on a plateau for hundreds of steps (docs/benchmarks.md); the CPU demo's tiny
    #: model, which has no pretrained BERT, pools by mean. Weights are the same either way.
    text_pool: str = "cls"
    #: what the ITM head reads: "cls" (the paper: the fused [CLS]) or "mean" (the mean of
    #: the fused tokens, padding excluded). Weights are the same either way.
    itm_pool: str = "cls"
    #: include the MLM loss (pretraining); retrieval fine-tuning trains ITC + ITM only.
    mlm: bool = True
    #: compute MLM logits only at masked positions (same loss, far less work).
    mlm_masked_only: bool = True
    #: with mlm_masked_only: pad the masked-token count up to a multiple of this (ignored
    #: labels, same loss) so the MLM head sees a few static shapes (torch.compile,
    #: CUDA graphs); 0: the exact count (a new shape almost every step).
    mlm_masked_bucket: int = 0
    #: share each image's cross-attention keys/values between the fusion passes.
    share_cross_kv: bool = True
    #: vectorised ITM sampling (one multinomial) vs the reference's per-sample loop.
    itm_vectorized_sampling: bool = True
    #: scaled_dot_product_attention in the BERT (False: explicit softmax(QK^T)V).
    sdpa: bool = True
    #: EMA update through torch._foreach ops (False: a Python loop per parameter).
    foreach_ema: bool = True
    #: recompute activations in backward (both encoders), trading compute for memory.
    activation_checkpointing: bool = False
    #: FP8 GEMMs through NVIDIA Transformer Engine (nn.Linear swapped for te.Linear under
    #: fp8_autocast, by albef_ds/train/fast_paths.py, not the model code); needs CUDA with
    #: compute capability >= 8.9 and the "fp8" extra. Not bit-equal to bf16: checked by
    #: albef_ds.cli.bench.fp8_accuracy_check.
    fp8: bool = False


#: data.decode_on's values (see DataConfig)
DECODE_ON = ("cpu", "device")
#: data.text_form's values (see DataConfig; albef_ds/data/text.py encode_texts)
TEXT_FORMS = ("cls_only", "cls_sep")


@dataclass
class DataConfig:
    #: MDS shard directories (local paths or remotes that streaming supports).
    train_dirs: list = field(default_factory=list)
    #: mixing weights, one per train dir (None: proportional to size).
    train_weights: Optional[list] = None
    #: a retrieval split (directory written by ``albef-data synth`` or annotation JSON).
    val_dir: Optional[str] = None
    test_dir: Optional[str] = None
    #: an HF tokenizer folder (tokenizer.json / vocab.txt); built by ``albef-data build-vocab``.
    tokenizer: Optional[str] = None
    max_words: int = 30
    #: tokens per text, [CLS] (and [SEP]) included: longer texts lose their last word pieces,
    #: as the reference's ``max_length`` cuts them.
    max_tokens: int = 30
    #: how one text (caption, question, hypothesis, expression) becomes tokens: "cls_only",
    #: ``[CLS] words`` (the reference's tokenizer: the released checkpoints were trained on
    #: it), or "cls_sep", ``[CLS] words [SEP]`` (Hugging Face BERT's; our runs before this
    #: setting existed). Checkpoints and exports record it; a resume, fine-tuning or
    #: evaluation with the other form is refused (docs/tasks.md, "Text inputs").
    text_form: str = "cls_only"
    num_workers: int = 2
    shuffle: bool = True
    shuffle_seed: int = 1234
    #: streaming's canonical node count (None: 64, or one per shard when there are fewer; see albef_ds/data/dataset.py); keep it
    #: fixed over a run's life so it resumes on a different number of nodes.
    num_canonical_nodes: Optional[int] = None
    #: a node-local cache for shards on shared filesystems (remote URLs are always cached);
    #: None: POSIX paths are read in place.
    cache_dir: Optional[str] = None
    #: bound on the node-local shard cache (streaming evicts the least recently used shards).
    cache_limit: str = "100gb"
    crop_scale_min: float = 0.2
    randaugment: bool = True
    randaugment_n: int = 2
    randaugment_m: int = 7
    #: a horizontal flip also swaps "left"/"right" in the caption (on for synth data).
    flip_swaps_left_right: bool = False
    pin_memory: bool = True
    prefetch_factor: int = 2
    #: where pretraining images are decoded and augmented: "cpu" (PIL in the loader workers)
    #: or "device" (workers read bytes only; decode_jpeg + tensor augmentation on the
    #: training device in the main process, albef_ds/data/device_transforms.py): the CPU path
    #: runs ~100-230 pairs per core-second at 256 px (docs/data_speed.md): many cores per GPU.
    #: Pretraining's loader (data/loader.py) only; the task loaders (data/tasks.py) decode on CPU.
    decode_on: str = "cpu"


@dataclass
class TrainConfig:
    #: the training objective (albef_ds.objectives.OBJECTIVES): pretrain, retrieval, itc, ...
    objective: str = "pretrain"
    seed: int = 42
    micro_batch_size: int = 64
    grad_accum_steps: int = 1
    epochs: int = 30
    #: stop after this many optimizer steps (None: run all epochs).
    max_steps: Optional[int] = None
    #: samples per epoch when the data size is unknown ahead (None: from the dataset).
    steps_per_epoch: Optional[int] = None
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.02
    #: learning-rate multiplier of the ITM path (the ITM head and the fusion layers'
    #: cross-attention), on top of the schedule. From random init that path leaves its
    #: plateau sooner at a higher rate (docs/benchmarks.md); 1: the paper's single rate.
    itm_lr_scale: float = 1.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    #: max gradient norm; None: the engine's default, 1.0 on both (DeepSpeed's gradient_clipping
    #: default when its JSON sets none; the fsdp2 engine follows it)
    grad_clip: Optional[float] = None
    #: alpha rises linearly from 0 over this many epochs (paper: 1; LAVIS: 2).
    alpha_ramp_epochs: float = 1.0
    #: "bf16", "fp16", "fp32", or "auto" (whatever the DeepSpeed JSON enables).
    precision: str = "auto"
    #: "auto" (DeepSpeed fused > apex > torch fused/foreach), "deepspeed", "apex", "torch".
    optimizer: str = "auto"
    #: normalise the MLM loss by the global number of masked tokens (exact DP equivalence).
    mlm_global_normalization: bool = False
    #: the global batch the preset's recipe (lr, warm-up, queue) was tuned at; start-up warns
    #: when a run's differs (None: no recipe to compare with).
    recipe_global_batch: Optional[int] = None
    #: "none", or "linear": lr, warmup_lr and min_lr scaled by global batch / recipe_global_batch.
    lr_scaling: str = "none"
    #: the ranks agree on a stop signal after every N-th optimizer step (a host sync each
    #: time: on a GPU it drains the step's queued kernels); a stop is taken within N - 1 steps.
    stop_check_every: int = 1
    #: the stop reduce is started without waiting and read a step later (no host sync of the
    #: step's work); a stop is then taken within N steps (albef_ds/train/stop.py StopCheck).
    stop_check_async: bool = False
    #: torch.compile of the transformer blocks: "none", "default", or "reduce-overhead"
    #: (CUDA graphs on CUDA; pair with model.mlm_masked_bucket). albef_ds/train/fast_paths.py
    compile: str = "none"


@dataclass
class DistributedConfig:
    #: the training engine: "deepspeed" (ZeRO 1-3, the ds_config below) or another name
    #: registered in albef_ds/train/engines/base.py (ENGINES); docs/design.md says which to choose
    engine: str = "deepspeed"
    #: a DeepSpeed JSON file, or the name of a shipped one (ds_configs/: zero2_bf16, zero3_bf16,
    #: zero2_fp32, ...); values this config owns are filled in.
    ds_config: str = "zero2_bf16"
    #: None: take the stage written in ds_config.
    zero_stage: Optional[int] = None
    #: "auto": nccl on CUDA, gloo on CPU.
    backend: str = "auto"


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    #: "auto" (latest in run_dir, if any), "none", or a checkpoint directory.
    resume: str = "auto"
    #: a weights file to start from (reference ALBEF .pth or an export of ours).
    init_from: Optional[str] = None
    #: load init_from even when it lacks tensors the model needs (they keep their fresh
    #: weights, each named in the log); off: such a checkpoint is refused, naming them.
    #: Only what the reference's own checkpoints never hold may be fresh otherwise
    #: (docs/tasks.md, "What loads strictly").
    allow_partial: bool = False
    #: a Hugging Face BERT folder to initialise the text/fusion encoder.
    bert_init: Optional[str] = None
    #: a timm/DeiT ViT state dict to initialise the image encoder.
    vit_init: Optional[str] = None


@dataclass
class LoggingConfig:
    run_dir: str = "runs/albef"
    log_every: int = 10
    tensorboard: bool = True
    #: write the sample keys each rank consumes per step (for resumption tests).
    log_sample_keys: bool = False
    progress_bar: bool = True


@dataclass
class EvalConfig:
    #: ITM re-ranking of the top k by ITC (ALBEF: 128 on Flickr30K, 256 on COCO).
    k_test: int = 128
    batch_size: int = 64
    #: zero-shot retrieval on data.val_dir every N steps during pretraining (0: never).
    every_steps: int = 0
    #: evaluate on at most this many images (None: all).
    max_images: Optional[int] = None


@dataclass
class TaskConfig:
    """Downstream tasks (``albef-ds finetune --task vqa|nlvr2|ve|grounding``): annotation
    JSON files in the reference ALBEF layouts (docs/tasks.md). Retrieval reads MDS shards
    (data.train_dirs) and data.val_dir instead."""
    train_files: list = field(default_factory=list)
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    #: folder that the JSON's image paths are relative to (None: each JSON file's folder)
    image_root: Optional[str] = None
    #: VQA: the candidate answers ranked at test time (the reference's answer_list.json)
    answer_list: Optional[str] = None
    #: VQA: candidates kept by the first token's probability before full ranking (reference: 128)
    k_test: int = 128
    #: momentum distillation (the reference's ``distill``): soft targets of the EMA model
    distill: bool = True
    #: fine-tuning crops (RandomResizedCrop scale lower bound; the reference: 0.5)
    crop_scale_min: float = 0.5
    #: grounding: the fusion layer whose cross-attention Grad-CAM reads (index among the
    #: fusion layers; None: the reference's, text layer 8 of 12 = fusion layer 2, or the last
    #: but one of a model with fewer fusion layers: GroundingObjective.gradcam_layer)
    gradcam_layer: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def global_batch(self, world_size: int) -> int:
        return self.train.micro_batch_size * world_size * self.train.grad_accum_steps

    def recipe_note(self, world_size: int) -> Optional[str]:
        """A start-up warning when the global batch differs from the recipe's, and the lr
        scaling applied (changes train.lr/warmup_lr/min_lr in place when linear)."""
        t, recipe = self.train, self.train.recipe_global_batch
        batch = self.global_batch(world_size)
        if not recipe or batch == recipe:
            return None
        if t.lr_scaling == "linear":
            factor = batch / recipe
            t.lr, t.warmup_lr, t.min_lr = t.lr * factor, t.warmup_lr * factor, t.min_lr * factor
            return (f"note: global batch {batch} differs from the recipe's {recipe}: lr scaled linearly "
                    f"x{factor:g} to {t.lr:g} (train.lr_scaling=linear)")
        return (f"WARNING: global batch {batch} differs from the recipe's {recipe} (lr {t.lr:g} was tuned "
                f"for {recipe}); set train.lr_scaling=linear to scale the lr, or change the batch")

    def pool_size(self, world_size: int) -> int:
        """Ranks in one negatives pool at this world size (model.negative_pool)."""
        pool = self.model.negative_pool
        return world_size if pool == "world" else min(int(pool), world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1) -> "Config":
        """Cross-field checks that need no model; raises ConfigError naming the key."""
        m, t = self.model, self.train
        _require(m.fusion_layer >= 0 and m.fusion_layer <= m.text_depth, "model.fusion_layer",
                 f"must lie in [0, model.text_depth={m.text_depth}], got {m.fusion_layer}")
        _require(m.image_res % m.patch_size == 0, "model.image_res",
                 f"{m.image_res} is not a multiple of model.patch_size={m.patch_size}")
        _require(m.text_width % m.text_heads == 0, "model.text_heads",
                 f"model.text_width={m.text_width} is not divisible by {m.text_heads} heads")
        _require(m.vision_width % m.vision_heads == 0, "model.vision_heads",
                 f"model.vision_width={m.vision_width} is not divisible by {m.vision_heads} heads")
        _require(0.0 < m.momentum < 1.0, "model.momentum", f"must lie in (0, 1), got {m.momentum}")
        _require(0.001 <= m.temp <= 0.5, "model.temp", f"must lie in [0.001, 0.5], got {m.temp}")
        _require(0.0 <= m.alpha <= 1.0, "model.alpha", f"must lie in [0, 1], got {m.alpha}")
        _require(m.mlm_masked_bucket >= 0, "model.mlm_masked_bucket", f"must be >= 0, got {m.mlm_masked_bucket}")
        _require(0.0 < m.mlm_probability < 1.0, "model.mlm_probability",
                 f"must lie in (0, 1), got {m.mlm_probability}")
        m.itc_candidates = "pool" if m.itc_candidates == "global" else m.itc_candidates
        m.itm_negatives = "pool" if m.itm_negatives == "global" else m.itm_negatives
        _require(m.itc_candidates in ("pool", "local"), "model.itc_candidates",
                 f"must be 'pool' or 'local', got {m.itc_candidates!r}")
        _require(0.0 <= m.itm_random_negatives <= 1.0, "model.itm_random_negatives",
                 f"must be a fraction in [0, 1], got {m.itm_random_negatives!r}")
        _require(0.0 <= m.itm_swap_negatives <= 1.0, "model.itm_swap_negatives",
                 f"must be a fraction in [0, 1], got {m.itm_swap_negatives!r}")
        _require(m.itm_swap_negatives == 0.0 or any(len(set(g)) >= 2 for g in m.itm_swap_words),
                 "model.itm_swap_words", "itm_swap_negatives > 0 needs a group of at least two words, e.g. "
                 "[[red, blue, green], [circle, square]]")
        _require(self.train.itm_lr_scale > 0, "train.itm_lr_scale",
                 f"must be > 0, got {self.train.itm_lr_scale!r}")
        _require(m.itm_exchange in ("rows", "gather"), "model.itm_exchange",
                 f"must be 'rows' or 'gather', got {m.itm_exchange!r}")
        _require(m.negative_pool == "world" or (m.negative_pool.isdigit() and int(m.negative_pool) >= 1),
                 "model.negative_pool", f"must be 'world' or a number of ranks >= 1, got {m.negative_pool!r}")
        pool = self.pool_size(world_size)
        _require(world_size % pool == 0, "model.negative_pool",
                 f"{m.negative_pool} ranks do not divide the world size {world_size}")
        _require(m.vision_pos_init in ("normal", "sincos"), "model.vision_pos_init",
                 f"must be 'normal' or 'sincos', got {m.vision_pos_init!r}")
        _require(m.itm_pool in ("cls", "mean"), "model.itm_pool",
                 f"must be 'cls' or 'mean', got {m.itm_pool!r}")
        _require(m.text_pool in ("cls", "mean"), "model.text_pool",
                 f"must be 'cls' or 'mean', got {m.text_pool!r}")
        _require(m.itm_negatives in ("pool", "local"), "model.itm_negatives",
                 f"must be 'pool' or 'local', got {m.itm_negatives!r}")
        _require(t.micro_batch_size >= 2, "train.micro_batch_size",
                 f"ITM needs at least 2 pairs per batch, got {t.micro_batch_size}")
        _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _require(t.lr_scaling in ("none", "linear"), "train.lr_scaling",
                 f"must be 'none' or 'linear', got {t.lr_scaling!r}")
        _require(t.lr_scaling == "none" or t.recipe_global_batch, "train.lr_scaling",
                 "'linear' needs train.recipe_global_batch (the batch the lr was tuned at)")
        _require(t.compile in ("none", "default", "reduce-overhead"), "train.compile",
                 f"must be none, default or reduce-overhead, got {t.compile!r}")
        _require(t.stop_check_every >= 1, "train.stop_check_every", f"must be >= 1, got {t.stop_check_every}")
        _require(t.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision",
                 f"must be auto, bf16, fp16 or fp32, got {t.precision!r}")
        _require(t.optimizer in ("auto", "deepspeed", "apex", "torch"), "train.optimizer",
                 f"must be auto, deepspeed, apex or torch, got {t.optimizer!r}")
        _require(self.data.max_tokens <= m.max_position_embeddings, "data.max_tokens",
                 f"{self.data.max_tokens} exceeds model.max_position_embeddings")
        # Features are enqueued once per micro-step for the pool's whole (gathered)
        # micro-batch, so the queue must hold a whole number of them for the pointer to wrap.
        per_enqueue = t.micro_batch_size * pool
        _require(m.queue_size % per_enqueue == 0, "model.queue_size",
                 f"{m.queue_size} is not a multiple of train.micro_batch_size x pool ranks "
                 f"= {t.micro_batch_size} x {pool} = {per_enqueue}")
        _require(self.data.text_form in TEXT_FORMS, "data.text_form",
                 f"must be one of {', '.join(TEXT_FORMS)}, got {self.data.text_form!r}")
        _require(self.data.max_tokens >= 3, "data.max_tokens",
                 f"must leave room for [CLS], a word piece and [SEP], got {self.data.max_tokens}")
        _require(self.data.decode_on in DECODE_ON, "data.decode_on",
                 f"must be one of {', '.join(DECODE_ON)}, got {self.data.decode_on!r}")
        if self.data.train_weights is not None:
            _require(len(self.data.train_weights) == len(self.data.train_dirs), "data.train_weights",
                     f"has {len(self.data.train_weights)} entries for {len(self.data.train_dirs)} train_dirs")
        return self


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


# ----------------------------------------------------------------------------- loading

def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return True, args[0] if len(args) == 1 else Any
    return False, tp


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' ({source}): may not be null")
    origin = typing.get_origin(inner) or inner
    if inner is Any:
        return value
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # a single path given on the command line
            return [value]
    raise ConfigError(
        f"config key '{key}' ({source}): expected {getattr(inner, '__name__', inner)}, "
        f"got {type(value).__name__} {value!r}")


def _apply(cfg: Config, section_values: dict, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, values in section_values.items():
        if section not in sections:
            raise ConfigError(_unknown(section, list(sections), source))
        if not isinstance(values, dict):
            raise ConfigError(f"config key '{section}' ({source}): expected a mapping of keys")
        target = getattr(cfg, section)
        types_ = _field_types(type(target))
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in types_:
                raise ConfigError(_unknown(dotted, [f"{section}.{k}" for k in types_], source))
            setattr(target, key, _coerce(value, types_[key], dotted, source))


def _unknown(key: str, valid: list, source: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"unknown config key '{key}' in {source}{hint}"


def resolve_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset ('tiny', 'albef-base'): albef_ds.presets."""
    from .presets import config_path
    return config_path(name_or_path)


def parse_overrides(overrides: list[str] | None) -> dict:
    """['model.queue_size=4096', ...] -> {'model': {'queue_size': 4096}}; YAML-typed values."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{key}' must be section.key (e.g. model.queue_size)")
        nested.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(raw) if raw != "" else None
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                world_size: int = 1) -> Config:
    """Load a YAML config (or a preset name), apply ``section.key=value`` overrides, validate."""
    cfg = Config()
    if path is not None:
        resolved = resolve_path(str(path))
        with open(resolved, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{resolved}: not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{resolved}: the top level must be a mapping of sections")
        _apply(cfg, values, str(resolved))
    _apply(cfg, parse_overrides(overrides), "--set")
    return cfg.validate(world_size)


def apply_overrides(cfg: Config, overrides, source: str) -> Config:
    """``section.key=value`` strings applied to a loaded config (e.g. an objective's needs)."""
    _apply(cfg, parse_overrides(list(overrides)), source)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
