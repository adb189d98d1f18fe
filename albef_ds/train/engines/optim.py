"""What every engine's optimizer shares: the AdamW parameter groups."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 itm_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and every other 0-D/1-D tensor. With
    ``itm_lr_scale`` != 1 the ITM path (:func:`on_itm_path`) gets groups of its own at
    ``lr * itm_lr_scale``; the schedule multiplies each group's own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        scaled = itm_lr_scale != 1.0 and on_itm_path(name)
        groups.setdefault((scaled, no_decay), []).append(p)
    out = []
    for (scaled, no_decay) in sorted(groups):
        group = {"params": groups[(scaled, no_decay)], "weight_decay": 0.0 if no_decay else weight_decay}
        if scaled:
            if lr is None:
                raise ValueError("param_groups: itm_lr_scale needs the base lr")
            group["lr"] = lr * itm_lr_scale
        out.append(group)
    return out


def on_itm_path(name: str) -> bool:
    """The parameters only image-text matching needs a fusion of: its head and the
    cross-attention of the fusion layers (MLM uses them too)."""
    return name.startswith("itm_head.") or ".crossattention." in name
