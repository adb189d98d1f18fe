"""What a resume does with each setting that differs from the checkpoint's config.

Every config key is in exactly one of two tables (a test holds them to the dataclasses):

- :data:`APPLIED`: the new value takes effect from the resumed step on; the value says how
  (the resume note prints it beside the change).
- :data:`REFUSED`: the checkpoint fixes the value (a shape, the loader's sample order, the
  optimizer's state, initial weights that the checkpoint's replace): a resume with another
  value is refused, naming the key, both values and why, before anything is written.

The comparison is against the config stored in the checkpoint's commit record, so a resume
from another run's checkpoint is held to what that checkpoint was trained with.
"""
from __future__ import annotations

import dataclasses

SCHEDULE = "applied: the lr schedule is re-derived from the new values from the resumed step on"
NEXT_STEP = "applied from the resumed step on"
NEXT_BATCH = "applied to the batches read after the resume"
OPTIMIZER_GROUPS = "applied: written into the optimizer's parameter groups after the checkpoint loaded"
PATH_ONLY = "applied (a path or where output goes)"
SHAPE = "sets a parameter's or buffer's shape"
INIT_ONLY = "sets initial weights only, and the checkpoint's weights replace them"
ORDER = "the loader's sample order and position are part of the checkpoint; start a new run to change it"

APPLIED: dict[str, str] = {
    # model: what each step computes
    **{f"model.{k}": NEXT_STEP for k in (
        "hidden_dropout", "attention_dropout", "layer_norm_eps", "momentum", "alpha", "mlm_probability",
        "itc_candidates", "itm_negatives", "itm_exchange", "itm_random_negatives", "itm_random_negatives_steps",
        "itm_swap_negatives", "itm_swap_words", "text_pool", "itm_pool", "mlm", "mlm_masked_only",
        "mlm_masked_bucket", "share_cross_kv", "itm_vectorized_sampling", "sdpa", "foreach_ema",
        "activation_checkpointing", "fp8")},
    "model.negative_pool": "applied: pools regroup from the resumed step on (pool p starts from the saved "
                           "queue of pool p mod the saved pool count)",
    # data: how batches are made
    **{f"data.{k}": NEXT_BATCH for k in (
        "max_words", "max_tokens", "num_workers", "crop_scale_min", "randaugment", "randaugment_n",
        "randaugment_m", "flip_swaps_left_right", "pin_memory", "prefetch_factor", "decode_on", "cache_limit")},
    **{f"data.{k}": PATH_ONLY for k in ("val_dir", "test_dir", "cache_dir")},
    "data.tokenizer": "applied: the same vocabulary, read from another folder (checked entry by entry)",
    # train
    **{f"train.{k}": SCHEDULE for k in (
        "lr", "min_lr", "warmup_lr", "warmup_steps", "epochs", "max_steps", "steps_per_epoch", "lr_scaling",
        "recipe_global_batch")},
    **{f"train.{k}": OPTIMIZER_GROUPS for k in ("weight_decay", "betas")},
    "train.itm_lr_scale": "applied: the ITM path's groups get the new multiple through the re-derived schedule",
    "train.seed": "applied: dropout, masks, negatives and augmentation draw from the new seed from the resumed step on",
    **{f"train.{k}": NEXT_STEP for k in (
        "micro_batch_size", "grad_accum_steps", "grad_clip", "alpha_ramp_epochs", "mlm_global_normalization",
        "stop_check_every", "stop_check_async", "compile")},
    **{k: "applied where the ZeRO stage and precision it gives are the checkpoint's (checked on their own)"
       for k in ("distributed.ds_config", "distributed.zero_stage", "train.precision")},
    "distributed.backend": NEXT_STEP,
    **{f"checkpoint.{k}": NEXT_STEP for k in ("every_steps", "keep_last", "resume")},
    **{f"logging.{k}": PATH_ONLY if k == "run_dir" else NEXT_STEP for k in (
        "run_dir", "log_every", "tensorboard", "log_sample_keys", "progress_bar")},
    **{f"eval.{k}": NEXT_STEP for k in ("k_test", "batch_size", "every_steps", "max_images")},
    **{f"task.{k}": PATH_ONLY for k in ("val_file", "test_file", "image_root", "answer_list")},
    **{f"task.{k}": NEXT_STEP for k in ("k_test", "distill", "crop_scale_min", "gradcam_layer")},
}

REFUSED: dict[str, str] = {
    **{f"model.{k}": SHAPE for k in (
        "image_res", "patch_size", "vision_width", "vision_depth", "vision_heads", "vision_mlp_ratio",
        "vocab_size", "text_width", "text_depth", "text_heads", "text_intermediate", "max_position_embeddings",
        "type_vocab_size", "fusion_layer", "embed_dim", "queue_size", "itc_id_positives")},
    "model.vision_pos_init": INIT_ONLY,
    "model.temp": "the initial temperature only: the checkpoint holds the learned one",
    **{f"data.{k}": ORDER for k in ("train_dirs", "train_weights", "shuffle", "shuffle_seed",
                                     "num_canonical_nodes")},
    "task.train_files": ORDER,
    "data.text_form": "the checkpoint was trained on texts of that form (albef_ds/data/text.py)",
    "distributed.engine": "an engine loads only the checkpoints it wrote (albef_ds/train/engines/)",
    "train.objective": "another objective has other heads and state: fine-tune from an export instead "
                       "(checkpoint.init_from)",
    "train.optimizer": "the optimizer's state in the checkpoint belongs to the optimizer that wrote it",
    **{f"checkpoint.{k}": INIT_ONLY for k in ("init_from", "bert_init", "vit_init")},
    "checkpoint.allow_partial": INIT_ONLY,
}


def all_keys(cfg) -> list[str]:
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name))]


def _default(cfg, key: str):
    section, name = key.split(".")
    part = getattr(type(cfg)(), section)
    return getattr(part, name)


def classify_changes(saved: dict, cfg) -> tuple[list[str], list[str]]:
    """(applied, refused): one line per key whose value differs between the checkpoint's
    config ``saved`` (a ``Config.to_dict()``; a key it lacks counts as its default) and
    ``cfg``."""
    applied, refused = [], []
    now = cfg.to_dict()
    for key in all_keys(cfg):
        section, name = key.split(".")
        new = now[section][name]
        old = (saved.get(section) or {}).get(name, _default(cfg, key))
        if old == new or (isinstance(old, (list, tuple)) and list(old) == list(new or [])):
            continue
        if key in REFUSED:
            refused.append(f"{key}: {old!r} in the checkpoint, {new!r} here ({REFUSED[key]})")
        else:
            applied.append(f"{key}: {old!r} -> {new!r}: {APPLIED[key]}")
    if refused:
        return applied, refused
    return applied, _groups_unchanged(saved, cfg)


def _groups_unchanged(saved: dict, cfg) -> list[str]:
    """train.itm_lr_scale 1 <-> another value splits or joins the optimizer's parameter
    groups, whose state the checkpoint holds per group: that change is refused."""
    old = float((saved.get("train") or {}).get("itm_lr_scale", 1.0))
    new = float(cfg.train.itm_lr_scale)
    if (old == 1.0) != (new == 1.0):
        return [f"train.itm_lr_scale: {old!r} in the checkpoint, {new!r} here (1 and any other value give "
                f"different optimizer parameter groups, whose state the checkpoint holds group by group)"]
    return []
