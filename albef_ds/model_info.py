"""``albef-ds model-info``: parameters per part and analytic FLOPs per training pair.

    albef-ds model-info --config configs/albef-base.yaml
    albef-ds model-info --config tiny --set model.image_res=128 --json
    albef-ds model-info --config configs/albef-base.yaml --check-flops

FLOPs per pair (:func:`analytic_flops`) are THE project's definition of MFU's numerator:
the matrix-multiply FLOPs (2 per multiply-add) of the REFERENCE ALBEF training step,
whatever our implementation saves. Per pair, the reference computes:

- the online ViT forward + backward and the momentum ViT forward;
- the online text encoder (layers ``[0, fusion_layer)``) forward + backward and the momentum
  one forward;
- the projections of both CLS tokens (online fwd + bwd, momentum fwd);
- ITC: online and momentum similarities against the batch plus the queue (B + Q
  candidates, both directions); backward only towards the online features, the candidates
  being momentum features without gradient;
- ITM: the fusion layers over 3 rows per pair (positive, negative image, negative text)
  forward + backward, cross-attention keys/values recomputed in each pass, and the ITM head;
- MLM: text + fusion layers over the masked caption online (fwd + bwd) and momentum (fwd),
  and the full-vocabulary MLM head at every position, online fwd + bwd and momentum fwd.

Backward costs twice the forward (gradients towards inputs and weights), except where an
input needs no gradient: the image pixels (the patch embedding's backward is its weight
gradient only) and the ITC candidates. Element-wise work (softmax, LayerNorm, GELU) is not
counted, as in every MFU convention; :func:`count_with_flop_counter` checks the count
against ``torch.utils.flop_counter.FlopCounterMode`` running our model with the
reference's switches (no cross-attention K/V sharing, MLM logits everywhere).
"""
from __future__ import annotations

import dataclasses

from typing import Optional

import torch
from torch import nn

from .config import Config, ModelConfig

# ----------------------------------------------------------------------- device peaks

#: Dense (no structured sparsity) peak FLOP/s per GPU from NVIDIA's datasheets.
#: "fp32" is the non-tensor-core rate; "tf32"/"bf16"/"fp16" the tensor-core rates.
PEAK_FLOPS = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100 SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    # H200 SXM: the H100 SXM's compute with more, faster memory; GH200 likewise.
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
}

_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                  "half": "fp16", "tf32": "tf32", "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def device_family(device_name: str) -> Optional[str]:
    """A key of PEAK_FLOPS for a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'H100 SXM')."""
    name = device_name.upper()
    if "H200" in name:
        return "H200 NVL" if "NVL" in name else "H200"
    if "GH200" in name:
        return "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        if "NVL" in name:
            return "H100 NVL"
        return "H100 SXM"  # 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 SXM5 …'
    if "A100" in name:
        return "A100"  # SXM and PCIe share the same peak
    return None


def device_peak_flops(device_name: str, dtype: str) -> Optional[float]:
    """Dense peak FLOP/s of ``device_name`` (torch.cuda.get_device_name) for ``dtype``
    ('bf16', 'bfloat16', 'fp16', 'tf32', 'fp32', 'float32', ...); None when unknown (a CPU,
    an unlisted GPU): no MFU is reported then."""
    family = device_family(device_name)
    key = _DTYPE_ALIASES.get(str(dtype).lower().replace("torch.", ""))
    if family is None or key is None:
        return None
    return PEAK_FLOPS[family][key]


# ----------------------------------------------------------------------- parameters

def count_params(model: nn.Module) -> dict:
    """Element counts per part of an ALBEF model, each tied tensor counted once (the MLM
    decoder weight is the word-embedding matrix). Works on the meta device.

    Keys: visual_encoder, text_encoder (= text_encoder.embeddings + .text_layers +
    .fusion_layers + .mlm_head), text_encoder.cross_attention (part of fusion_layers),
    projections, itm_head, temp, trainable, momentum, buffers, buffer_bytes, total."""
    fusion = model.cfg.fusion_layer
    out = dict.fromkeys(
        ["visual_encoder", "text_encoder", "text_encoder.embeddings", "text_encoder.text_layers",
         "text_encoder.fusion_layers", "text_encoder.cross_attention", "text_encoder.mlm_head",
         "projections", "itm_head", "temp", "other", "trainable", "momentum", "frozen",
         "buffers", "buffer_bytes", "total"], 0)
    for name, p in model.named_parameters():  # remove_duplicate=True: tied tensors once
        n = p.numel()
        out["total"] += n
        top = name.split(".")[0]
        if top.endswith("_m"):
            out["momentum"] += n
        elif p.requires_grad:
            out["trainable"] += n
        else:
            out["frozen"] += n
        if top.endswith("_m"):
            continue
        if top == "visual_encoder":
            out["visual_encoder"] += n
        elif top == "text_encoder":
            out["text_encoder"] += n
            if ".embeddings." in name:
                out["text_encoder.embeddings"] += n
            elif ".encoder.layer." in name:
                layer = int(name.split(".encoder.layer.")[1].split(".")[0])
                if layer < fusion:
                    out["text_encoder.text_layers"] += n
                else:
                    out["text_encoder.fusion_layers"] += n
                    if ".crossattention." in name:
                        out["text_encoder.cross_attention"] += n
            else:
                out["text_encoder.mlm_head"] += n
        elif top in ("vision_proj", "text_proj"):
            out["projections"] += n
        elif top in ("itm_head", "temp"):
            out[top] += n
        else:
            out["other"] += n
    for _, b in model.named_buffers():
        out["buffers"] += b.numel()
        out["buffer_bytes"] += b.numel() * b.element_size()
    return out


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    """ALBEF on the meta device: shapes only, no memory, built in a moment."""
    from .models import ALBEF
    with torch.device("meta"):
        return ALBEF(cfg)


# ----------------------------------------------------------------------- analytic FLOPs

def _linear(tokens: float, d_in: float, d_out: float) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_len: float, k_len: float, width: float) -> float:
    """QK^T and attention x V over all heads."""
    return 4.0 * q_len * k_len * width


def forward_flops(m: ModelConfig, text_len: int) -> dict[str, float]:
    """Forward matmul FLOPs of each building block, for one image / one caption."""
    n_patches = (m.image_res // m.patch_size) ** 2
    n_img = n_patches + 1
    dv, dt, e = m.vision_width, m.text_width, m.embed_dim
    hidden_v = int(m.vision_width * m.vision_mlp_ratio)
    L = text_len
    vit_layer = (_linear(n_img, dv, 3 * dv) + _attention(n_img, n_img, dv) + _linear(n_img, dv, dv)
                 + _linear(n_img, dv, hidden_v) + _linear(n_img, hidden_v, dv))
    text_layer = (_linear(L, dt, 3 * dt) + _attention(L, L, dt) + _linear(L, dt, dt)
                  + _linear(L, dt, m.text_intermediate) + _linear(L, m.text_intermediate, dt))
    cross = (_linear(L, dt, dt) + _linear(n_img, dv, 2 * dt) + _attention(L, n_img, dt)
             + _linear(L, dt, dt))
    return {
        "patch_embed": _linear(n_patches, 3 * m.patch_size ** 2, dv),
        "vit_layers": m.vision_depth * vit_layer,
        "text_layers": m.fusion_layer * text_layer,
        "fusion_layers": (m.text_depth - m.fusion_layer) * (text_layer + cross),
        "mlm_head": _linear(L, dt, dt) + _linear(L, dt, m.vocab_size),
        "projections": _linear(1, dv, e) + _linear(1, dt, e),
        "itm_head": _linear(1, dt, 2),
    }


def analytic_flops_table(cfg: Config, text_len: int, batch: Optional[int] = None) -> dict[str, dict]:
    """Per part: {'fwd', 'bwd', 'momentum_fwd', 'total'} FLOPs per training pair of the
    reference algorithm (module docstring). ``batch`` (default train.micro_batch_size) only
    sets the ITC candidate count B + queue_size."""
    m = cfg.model
    f = forward_flops(m, text_len)
    b = cfg.train.micro_batch_size if batch is None else batch
    vit = f["patch_embed"] + f["vit_layers"]
    itc_fwd = 2 * _linear(1, m.embed_dim, b + m.queue_size)  # i2t and t2i rows of one pair
    rows = {
        # (forward, backward, momentum forward)
        "visual_encoder": (vit, 2 * f["vit_layers"] + f["patch_embed"], vit),
        "text_encoder": (f["text_layers"], 2 * f["text_layers"], f["text_layers"]),
        "projections": (f["projections"], 2 * f["projections"], f["projections"]),
        "itc": (itc_fwd, itc_fwd, itc_fwd),
        "itm_fusion": (3 * f["fusion_layers"], 6 * f["fusion_layers"], 0.0),
        "itm_head": (3 * f["itm_head"], 6 * f["itm_head"], 0.0),
    }
    if m.mlm:
        rows.update({
            "mlm_text": (f["text_layers"], 2 * f["text_layers"], f["text_layers"]),
            "mlm_fusion": (f["fusion_layers"], 2 * f["fusion_layers"], f["fusion_layers"]),
            "mlm_head": (f["mlm_head"], 2 * f["mlm_head"], f["mlm_head"]),
        })
    return {k: {"fwd": a, "bwd": bw, "momentum_fwd": mo, "total": a + bw + mo}
            for k, (a, bw, mo) in rows.items()}


def analytic_flops(cfg: Config, text_len: int, batch: Optional[int] = None) -> dict[str, float]:
    """FLOPs per training pair of the reference ALBEF algorithm, per part and 'total'.
    The numerator of MFU everywhere in this project (bench, pretrain logs)."""
    table = analytic_flops_table(cfg, text_len, batch)
    out = {k: v["total"] for k, v in table.items()}
    out["total"] = sum(out.values())
    return out


def executed_flops(cfg: Config, text_len: int, batch: Optional[int] = None) -> float:
    """FLOPs per pair that our step executes with the config's switches, next to the
    reference algorithm's (:func:`analytic_flops`): the MLM vocabulary projection only at
    the masked positions (expected fraction model.mlm_probability), cross-attention keys and
    values computed once per image instead of once per fusion pass, and, with pooled ITM
    negatives, the negative captions re-encoded by the text layers (forward + backward)."""
    m = cfg.model
    table = analytic_flops_table(cfg, text_len, batch)
    total = sum(v["total"] for v in table.values())
    n_img = (m.image_res // m.patch_size) ** 2 + 1
    fusion_depth = m.text_depth - m.fusion_layer
    f = forward_flops(m, text_len)
    if m.mlm and m.mlm_masked_only:
        vocab_proj = _linear(text_len, m.text_width, m.vocab_size)
        total -= (1 - m.mlm_probability) * 3 * vocab_proj  # fwd + bwd (x2), momentum fwd of the same rows
    if m.share_cross_kv:
        kv = fusion_depth * _linear(n_img, m.vision_width, 2 * m.text_width)
        passes_ref = 3 + (1 if m.mlm else 0)        # online fusion passes, each computing K/V
        passes_ours = 2 if m.itm_negatives == "pool" else 1  # own images once (+ drawn negatives)
        total -= 3 * kv * (passes_ref - passes_ours)  # forward + backward
    if m.itm_negatives == "pool":
        total += 3 * f["text_layers"]
    return total


#: Forward FLOPs are compared per group: (analytic parts, our modules they run in).
_GROUPS = {
    "visual encoders": (("visual_encoder",), ("ALBEF.visual_encoder", "ALBEF.visual_encoder_m")),
    "text encoders (BERT)": (("text_encoder", "itm_fusion", "mlm_text", "mlm_fusion", "mlm_head"),
                             ("ALBEF.text_encoder", "ALBEF.text_encoder_m")),
}


def _module_flops(counts: dict, prefix: str) -> float:
    """FLOPs a FlopCounterMode attributed to the modules under ``prefix``, each counted at
    its outermost called module (a parent that is never called itself has no entry)."""
    names = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
    outer = [k for k in names if not any(k.startswith(o + ".") for o in names if o != k)]
    return float(sum(sum(counts[k].values()) for k in outer))


def reference_switches(m: ModelConfig) -> ModelConfig:
    """Our model configured to compute what the reference computes (for the counter):
    cross-attention K/V per fusion pass, MLM logits at every position, ITC and ITM on the
    local batch (no re-encoding of negatives from other ranks)."""
    return dataclasses.replace(m, share_cross_kv=False, mlm_masked_only=False,
                               itc_candidates="local", itm_negatives="local",
                               activation_checkpointing=False)


def count_with_flop_counter(cfg: Config, text_len: int, batch: int = 2,
                            device: str = "cpu", seed: int = 0) -> dict:
    """Run one training forward + backward of ALBEF under ``FlopCounterMode`` (SDPA forced
    to its math kernel so that attention is counted) and compare with the analytic count.

    Forward FLOPs are compared per group of modules (the counter attributes backward FLOPs
    to modules unreliably), backward FLOPs in total. Returns {'counted': per pair,
    'analytic': per pair, 'ratio': analytic / counted, 'groups': {name: (analytic, counted)}}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .models import ALBEF
    from .objectives.pretrain import albef_forward

    mcfg = reference_switches(cfg.model)
    if mcfg.queue_size % batch:
        raise ValueError(f"queue_size {mcfg.queue_size} is not a multiple of the check batch {batch}")
    torch.manual_seed(seed)
    model = ALBEF(mcfg).to(device).train()
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch, 3, mcfg.image_res, mcfg.image_res, generator=g).to(device)
    ids = torch.randint(1000 if mcfg.vocab_size > 1000 else 5, mcfg.vocab_size, (batch, text_len), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, text_len // 2:] = 0  # some padding, as real batches have
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)

    fwd_counter, bwd_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with fwd_counter:
            out = model(albef_forward, images, ids, mask, ids, labels, alpha=0.4,
                        generator=torch.Generator(device=device).manual_seed(seed))
        with bwd_counter:
            out["loss"].backward()
    fwd_counts = fwd_counter.get_flop_counts()
    counted_fwd = fwd_counter.get_total_flops() / batch
    counted_bwd = bwd_counter.get_total_flops() / batch
    table = analytic_flops_table(dataclasses.replace(cfg, model=mcfg), text_len, batch)
    fwd = {k: v["fwd"] + v["momentum_fwd"] for k, v in table.items()}
    rows = {}
    for name, (parts, modules) in _GROUPS.items():
        rows[f"forward: {name}"] = (sum(fwd.get(k, 0.0) for k in parts),
                                    sum(_module_flops(fwd_counts, m) for m in modules) / batch)
    rows["forward: rest (proj., ITC, ITM head)"] = (
        sum(fwd.values()) - sum(a for a, _ in rows.values()), counted_fwd - sum(c for _, c in rows.values()))
    rows["backward: all"] = (sum(v["bwd"] for v in table.values()), counted_bwd)
    analytic = sum(v["total"] for v in table.values())
    counted = counted_fwd + counted_bwd
    return {"counted": counted, "analytic": analytic, "ratio": analytic / counted,
            "groups": rows, "batch": batch, "text_len": text_len}


# ----------------------------------------------------------------------- CLI
