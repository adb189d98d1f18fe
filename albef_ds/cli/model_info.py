"""``albef-ds model-info``: parameter counts and analytic FLOPs per part (albef_ds.model_info)."""
from __future__ import annotations

import argparse
import json

from ..config import Config, load_config
from ..model_info import (analytic_flops, analytic_flops_table, build_meta_model, count_params, count_with_flop_counter)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides
    p.add_argument("--config", required=True, help="YAML config or preset name (tiny, albef-base)")
    add_overrides(p)
    p.add_argument("--text-len", type=int, default=None,
                   help="tokens per caption for the FLOP count (default: data.max_tokens)")
    p.add_argument("--batch", type=int, default=None,
                   help="pairs per rank for the ITC candidate count (default: train.micro_batch_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--check-flops", action="store_true",
                   help="also count FLOPs with torch's FlopCounterMode (one real step) and print the ratio")
    p.add_argument("--check-batch", type=int, default=2, help="pairs in the FlopCounterMode step")
    p.add_argument("--check-device", default="cpu", help="device of the FlopCounterMode step")


def _g(x: float) -> str:
    return f"{x / 1e9:10.2f}"


def format_report(cfg: Config, params: dict, table: dict, text_len: int, batch: int) -> str:
    m = cfg.model
    n_img = (m.image_res // m.patch_size) ** 2 + 1
    f = m.fusion_layer
    lines = [
        f"ViT {m.vision_width}x{m.vision_depth} ({m.vision_heads} heads, patch {m.patch_size}) at "
        f"{m.image_res} px = {n_img} image tokens; BERT {m.text_width}x{m.text_depth} "
        f"(text layers 0-{f - 1}, fusion layers {f}-{m.text_depth - 1}), vocab {m.vocab_size}; "
        f"{text_len} text tokens; queue {m.queue_size}",
        "",
        "Parameters (tied tensors counted once)",
        f"  visual encoder (ViT)                  {params['visual_encoder']:>14,}",
        f"  text encoder (BERT)                   {params['text_encoder']:>14,}",
        f"    embeddings                          {params['text_encoder.embeddings']:>14,}",
        f"    text layers 0-{f - 1:<3}                    {params['text_encoder.text_layers']:>14,}",
        f"    fusion layers {f}-{m.text_depth - 1:<3}                  {params['text_encoder.fusion_layers']:>14,}",
        f"      of which cross-attention          {params['text_encoder.cross_attention']:>14,}",
        f"    MLM head (decoder tied to words)    {params['text_encoder.mlm_head']:>14,}",
        f"  projections (vision, text)            {params['projections']:>14,}",
        f"  ITM head                              {params['itm_head']:>14,}",
        f"  temp                                  {params['temp']:>14,}",
        f"  trainable                             {params['trainable']:>14,}",
        f"  momentum copies (EMA, no gradient)    {params['momentum']:>14,}",
        f"  buffers (queues, position ids, ptr)   {params['buffers']:>14,}  "
        f"({params['buffer_bytes'] / 2**20:.1f} MiB)",
        "",
        f"FLOPs per training pair, reference algorithm (GFLOP; matmuls, 2 per MAC; ITC over "
        f"{batch} + {m.queue_size} candidates)",
        f"  {'part':24s}{'fwd':>10s}{'bwd':>10s}{'momentum':>10s}{'total':>10s}{'share':>8s}",
    ]
    total = sum(v["total"] for v in table.values())
    labels = {"visual_encoder": "visual encoder", "text_encoder": "text encoder (ITC)",
              "projections": "projections", "itc": "ITC similarities",
              "itm_fusion": "ITM fusion (3 rows)", "itm_head": "ITM head",
              "mlm_text": "MLM text layers", "mlm_fusion": "MLM fusion layers",
              "mlm_head": "MLM head (all tokens)"}
    for k, v in table.items():
        lines.append(f"  {labels.get(k, k):24s}{_g(v['fwd'])}{_g(v['bwd'])}{_g(v['momentum_fwd'])}"
                     f"{_g(v['total'])}{100 * v['total'] / total:7.1f}%")
    sums = {c: sum(v[c] for v in table.values()) for c in ("fwd", "bwd", "momentum_fwd")}
    lines.append(f"  {'total':24s}{_g(sums['fwd'])}{_g(sums['bwd'])}{_g(sums['momentum_fwd'])}{_g(total)}")
    return "\n".join(lines)


def format_check(check: dict) -> str:
    lines = [f"FlopCounterMode check (one fwd+bwd step, batch {check['batch']}, SDPA math kernel, "
             f"reference switches; GFLOP per pair)",
             f"  {'group':38s}{'analytic':>10s}{'counted':>10s}{'ratio':>8s}"]
    for name, (a, c) in check["groups"].items():
        ratio = f"{a / c:8.3f}" if c else "       -"
        lines.append(f"  {name:38s}{_g(a)}{_g(c)}{ratio}")
    lines.append(f"  {'total':38s}{_g(check['analytic'])}{_g(check['counted'])}{check['ratio']:8.3f}")
    return "\n".join(lines)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    text_len = args.text_len or cfg.data.max_tokens
    batch = args.batch or cfg.train.micro_batch_size
    params = count_params(build_meta_model(cfg.model))
    table = analytic_flops_table(cfg, text_len, batch)
    flops = analytic_flops(cfg, text_len, batch)
    check = None
    if args.check_flops:
        check = count_with_flop_counter(cfg, text_len, args.check_batch, args.check_device)
    if args.json:
        out = {"config": str(args.config), "text_len": text_len, "batch": batch,
               "params": params, "flops_per_pair": flops, "flops_table": table}
        if check is not None:
            out["check"] = {**check, "groups": {k: {"analytic": a, "counted": c}
                                                for k, (a, c) in check["groups"].items()}}
        print(json.dumps(out, indent=2))
        return 0
    print(format_report(cfg, params, table, text_len, batch))
    if check is not None:
        print()
        print(format_check(check))
    return 0
