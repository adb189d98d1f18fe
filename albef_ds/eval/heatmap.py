"""Grad-CAM maps drawn over their image, for looking at what grounding attends to."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

#: output images are at least this many pixels on the short side (the synth images are 64 px)
MIN_SIDE = 256
#: how much of the heat colour covers the image where the map is highest
OVERLAY = 0.6


def heat_overlay(image: Image.Image, cam: torch.Tensor) -> Image.Image:
    """``image`` with the map ``cam`` [h, w] (any scale) upsampled bicubically and blended
    in as red-to-yellow where it is high."""
    w, h = image.size
    heat = F.interpolate(cam.float()[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    heat = heat.clamp(min=0)
    heat = (heat / heat.max()).numpy() if float(heat.max()) > 0 else np.zeros((h, w), dtype=np.float32)
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1) * 255
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    alpha = OVERLAY * heat[..., None]
    return Image.fromarray((base * (1 - alpha) + colour * alpha).astype(np.uint8))


def save_heatmap(path: Path, image_path: Path, cam: torch.Tensor, text: str, truth, chosen) -> None:
    """PNG: the image with the map, the true box (green) and the chosen box (red), the
    expression written underneath."""
    with Image.open(image_path) as img:
        picture = heat_overlay(img.convert("RGB"), cam)
    scale = max(1.0, MIN_SIDE / min(picture.size))
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)
    canvas = Image.new("RGB", (picture.width, picture.height + 20), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for box, colour in ((truth, (0, 200, 0)), (chosen, (230, 0, 0))):
        x, y, w, h = (v * scale for v in box)
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
    draw.text((4, picture.height + 4), text, fill=(0, 0, 0))
    canvas.save(path)
