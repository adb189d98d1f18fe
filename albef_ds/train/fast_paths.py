"""GPU fast paths applied to a built model from outside the model code (as torchtitan's
``parallelize.py`` applies compilation): torch.compile of the transformer blocks
(``train.compile``) and FP8 GEMMs through NVIDIA Transformer Engine (``model.fp8``).

Both leave parameter names and the state dict as they are, so checkpoints, the EMA's
momentum pairs and exports see the same model with either switch.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import UsageError

#: train.compile: "none" (eager), "default" (inductor), "reduce-overhead" (inductor + CUDA
#: graphs on CUDA: static shapes pay off, see model.mlm_masked_bucket; on a CPU inductor
#: skips the graphs and the mode runs as "default").
COMPILE_MODES = ("none", "default", "reduce-overhead")

#: FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FP8_MIN_CAPABILITY = (8, 9)
FP8_ERROR = ("model.fp8 needs CUDA with compute capability >= 8.9 and transformer-engine installed "
             "(pip install 'albef-ds[fp8]')")


def compile_blocks(model, mode: str = "default") -> None:
    """torch.compile each transformer block of both encoders, online and momentum, in
    place (parameter names and the state dict unchanged). Blocks, not whole encoders: the
    BERT is entered through ``encode_text``/``fuse``, which compiling the module would miss,
    and the MLM head sees a data-dependent number of rows (unless model.mlm_masked_bucket)."""
    if mode == "none":
        return
    if mode not in COMPILE_MODES:
        raise UsageError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    kwargs = {} if mode == "default" else {"mode": mode}
    for name in ("visual_encoder", "visual_encoder_m"):
        for block in getattr(model, name).blocks:
            block.compile(**kwargs)
    for name in ("text_encoder", "text_encoder_m"):
        for layer in getattr(model, name).bert.encoder.layer:
            layer.compile(**kwargs)


def require_fp8():
    """transformer_engine.pytorch, or a one-line UsageError saying what is missing."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        raise UsageError(FP8_ERROR)
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        raise UsageError(FP8_ERROR) from None
    return te


def fp8_eligible(module: torch.nn.Linear, tied: set) -> bool:
    """FP8 GEMMs need both dimensions divisible by 16; a weight tied to another module (the
    MLM decoder shares the word embeddings) stays an nn.Linear so the tie holds."""
    return (module.in_features % 16 == 0 and module.out_features % 16 == 0
            and id(module.weight) not in tied)


def swap_linears_for_fp8(model: torch.nn.Module) -> int:
    """Replace every eligible nn.Linear (online and momentum encoders alike, so the EMA's
    pairs still match by name) by a te.Linear holding the same weights; returns how many."""
    te = require_fp8()
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or not fp8_eligible(child, tied):
                continue
            new = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                            params_dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            new.weight.requires_grad_(child.weight.requires_grad)
            if child.bias is not None:
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(parent, child_name, new)
            swapped += 1
    return swapped


def fp8_autocast(enabled: bool):
    """The forward's context: TE's fp8_autocast with its default delayed-scaling recipe
    (E4M3 forward, E5M2 gradients: HYBRID) when ``enabled``, else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    te = require_fp8()
    from transformer_engine.common.recipe import DelayedScaling, Format
    return te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID))


def apply(model: torch.nn.Module, cfg, log=print) -> torch.nn.Module:
    """The configured fast paths on a built model (before the engine wraps it). FP8 first:
    compilation traces the te.Linear modules that replace nn.Linear."""
    if cfg.model.fp8:
        log(f"model.fp8: {swap_linears_for_fp8(model)} linear layers run FP8 GEMMs (Transformer Engine)")
    compile_blocks(model, cfg.train.compile)
    return model
