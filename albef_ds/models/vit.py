"""The image encoder: timm's VisionTransformer, with ALBEF's presets and resolution changes.

We do not write a ViT: timm's is the reference implementation DeiT weights come from.
ALBEF keeps every token (CLS + patches) for the fusion encoder, has no classifier head,
and uses LayerNorm eps 1e-6, no dropout and no drop-path in pretraining.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ImageEncoder(VisionTransformer):
    """timm's ViT whose ``forward`` returns every token after the final norm.

    Calling the module (rather than ``forward_features``) matters under ZeRO-3: parameters
    are gathered by hooks around a module's ``__call__``, and ``cls_token``/``pos_embed``
    belong to this module itself.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._choose_attention(images)
        return self.forward_features(images)

    def _choose_attention(self, images: torch.Tensor) -> None:
        """timm attends through SDPA (``fused_attn``); on CPU under bf16 autocast its flash
        kernel is 6-13x slower than the explicit form (see bert.sdpa_pays_off), so the
        blocks use the explicit form there. Same attention either way."""
        if images.device.type != "cpu":
            return
        bf16 = images.dtype != torch.float32 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32)
        fused = not bf16
        for block in self.blocks:
            if getattr(block.attn, "fused_attn", fused) != fused:
                block.attn.fused_attn = fused


def build_vit(image_res: int, patch_size: int, width: int, depth: int, heads: int,
              mlp_ratio: float = 4.0, activation_checkpointing: bool = False,
              pos_init: str = "normal") -> ImageEncoder:
    """``pos_init``: "normal" keeps timm's initial position embedding; "sincos" replaces the
    patches' rows with :func:`sincos_2d` (CLS's row zero), drawn after timm's so that every
    other initial weight is the same either way."""
    vit = ImageEncoder(
        img_size=image_res, patch_size=patch_size, embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
        global_pool="token", class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    if pos_init == "sincos":
        with torch.no_grad():
            vit.pos_embed[0, 0].zero_()
            vit.pos_embed[0, 1:].copy_(sincos_2d(width, image_res // patch_size))
    elif pos_init != "normal":
        raise ValueError(f"pos_init must be 'normal' or 'sincos', got {pos_init!r}")
    vit.set_grad_checkpointing(activation_checkpointing)
    return vit


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sine-cosine position table, [grid * grid, width], patches in row-major
    order: the first half of the channels encodes the row, the second the column, each as
    sin and cos of the position times frequencies 10000^(-k / (width / 4)), k < width / 4."""
    if width % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {width}")
    quarter = width // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.flatten().double()[:, None] * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def encode(vit: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """All tokens after the final norm: [B, 1 + (R/patch)^2, width]."""
    return vit(images)


def grid_size(num_patches: int) -> int:
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise ValueError(f"position embedding of {num_patches} patches is not a square grid")
    return side


def resample_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubic resampling of a [1, 1 + g*g, D] position embedding to ``num_patches`` patches,
    the CLS position kept (as ALBEF and timm do when changing resolution)."""
    old = grid_size(pos_embed.shape[1] - 1)
    new = grid_size(num_patches)
    if old == new:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[new, new], old_size=[old, old],
                                  num_prefix_tokens=1, interpolation="bicubic", antialias=False)


def adapt_vit_state_dict(state_dict: dict, vit: VisionTransformer, prefix: str = "") -> dict:
    """Resample ``{prefix}pos_embed`` to ``vit``'s resolution and drop classifier heads that
    a DeiT/timm checkpoint carries but ALBEF does not (head, head_dist, dist_token)."""
    out = {}
    target = vit.patch_embed.num_patches
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is None:
            out[key] = value
            continue
        if name.startswith(("head.", "head_dist.", "fc_norm.")) or name == "dist_token":
            continue
        if name == "pos_embed":
            if name == "pos_embed" and "dist_token" in {k[len(prefix):] for k in state_dict}:
                # DeiT-distilled: CLS + distillation token ahead of the patches; keep CLS.
                value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
            value = resample_pos_embed(value, target)
        out[key] = value
    return out
