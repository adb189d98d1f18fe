"""ALBEF's image transforms, with every random draw taken from a ``random.Random`` the caller
seeds per sample, so a resumed run repeats the same crops, flips and RandAugment ops.

Pretraining (ALBEF): RandomResizedCrop(res, scale=(0.2, 1), bicubic), horizontal flip,
ALBEF's RandAugment(N=2, M=7), CLIP normalisation. Evaluation: resize to res x res
(bicubic), CLIP normalisation.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import InterpolationMode

# CLIP's mean/std, which ALBEF normalises with (ALBEF_FACTS.md).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: RandomResizedCrop's aspect-ratio range and tries (torchvision's defaults, which ALBEF uses).
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10

# ALBEF's RandomAugment: magnitudes on a 0-10 scale; fill grey (128) outside the image.
MAX_LEVEL = 10.0
FILL = (128, 128, 128)
#: translation at level 10, in pixels at 256 px (ALBEF: translate_const 10 on 256 px crops);
#: scaled with the image size here so a 64 px crop moves by the same fraction.
TRANSLATE_CONST_256 = 10.0
#: each op chosen is applied with this probability (ALBEF: 0.5)
OP_PROB = 0.5
RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
#: the ops that draw a direction (one ``rng.random()``) when applied
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation RNG of one sample (seed, epoch, dataset-wide sample index):
    independent of worker, rank, batch and resumption (dataset.py)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() < 0.5 else v


def _apply_signed(img: Image.Image, op: str, level: float, sign: float) -> Image.Image:
    """One op at ``level``; ``sign`` (+1/-1) is the direction of the geometric ops."""
    frac = level / MAX_LEVEL
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Brightness":
        return ImageEnhance.Brightness(img).enhance(frac * 1.8 + 0.1)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(frac * 1.8 + 0.1)
    if op in ("ShearX", "ShearY"):
        s = sign * frac * 0.3
        w, h = img.size
        # shear about the image centre, as ALBEF's cv2 version does
        if op == "ShearX":
            m = (1, s, -s * h / 2, 0, 1, 0)
        else:
            m = (1, 0, 0, s, 1, -s * w / 2)
        return img.transform(img.size, Image.Transform.AFFINE, m, resample=Image.Resampling.BILINEAR,
                             fillcolor=FILL)
    if op in ("TranslateX", "TranslateY"):
        t = sign * frac * TRANSLATE_CONST_256 * img.size[0] / 256.0
        m = (1, 0, -t, 0, 1, 0) if op == "TranslateX" else (1, 0, 0, 0, 1, -t)
        return img.transform(img.size, Image.Transform.AFFINE, m, resample=Image.Resampling.BILINEAR,
                             fillcolor=FILL)
    if op == "Rotate":
        return img.rotate(sign * frac * 30.0, resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown RandAugment op {op}")


def _apply_op(img: Image.Image, op: str, level: float, rng: random.Random) -> Image.Image:
    return _apply_signed(img, op, level, _signed(1.0, rng) if op in SIGNED_OPS else 1.0)


def rand_augment(img: Image.Image, n: int, m: int, rng: random.Random) -> Image.Image:
    """ALBEF's RandAugment: n ops drawn with replacement from RANDAUG_OPS (no colour-changing
    op), each applied with probability 0.5 at magnitude m."""
    for op in rng.choices(RANDAUG_OPS, k=n):
        if rng.random() < OP_PROB:
            img = _apply_op(img, op, float(m), rng)
    return img


def crop_params(width: int, height: int, scale: tuple, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn from ``rng`` (torchvision's algorithm)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fall back to a centre crop at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


@dataclass(frozen=True)
class AugPlan:
    """Every random decision of one sample's train transform, drawn before any pixel is touched:
    the CPU path applies it with PIL, the device path (device_transforms.py) with tensor ops,
    so both make the same crops, flips and RandAugment choices for the same seed."""
    box: tuple  # RandomResizedCrop's (top, left, h, w) in the source image
    flip: bool
    ops: tuple  # the RandAugment ops applied, in order: ((name, sign), ...)


class TrainTransform:
    """(PIL image, rng) -> (normalised tensor [3, res, res], flipped?)."""

    def __init__(self, res: int, crop_scale_min: float = 0.2, randaugment: bool = True,
                 randaugment_n: int = 2, randaugment_m: int = 7, flip: bool = True):
        self.res, self.scale = res, (crop_scale_min, 1.0)
        self.randaugment, self.n, self.m, self.flip = randaugment, randaugment_n, randaugment_m, flip

    def plan(self, width: int, height: int, rng: random.Random) -> AugPlan:
        """The draws, in the order this transform has always made them (a resumed run and the
        device path rely on it): crop box, flip, then per RandAugment op its choice, its
        probability and, for a geometric op, its direction."""
        box = crop_params(width, height, self.scale, rng)
        flipped = self.flip and rng.random() < 0.5
        ops = []
        if self.randaugment:
            for op in rng.choices(RANDAUG_OPS, k=self.n):
                if rng.random() < OP_PROB:
                    ops.append((op, _signed(1.0, rng) if op in SIGNED_OPS else 1.0))
        return AugPlan(box, flipped, tuple(ops))

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[torch.Tensor, bool]:
        img = img.convert("RGB")
        plan = self.plan(img.width, img.height, rng)
        top, left, h, w = plan.box
        img = TF.resized_crop(img, top, left, h, w, [self.res, self.res],
                              interpolation=InterpolationMode.BICUBIC)
        if plan.flip:
            img = TF.hflip(img)
        for op, sign in plan.ops:
            img = _apply_signed(img, op, float(self.m), sign)
        return _to_tensor(img), plan.flip


def make_train_transform(cfg) -> TrainTransform:
    """ALBEF's pretraining transform from a ``Config`` (model.image_res, data.crop_scale_min,
    data.randaugment*). Call it as ``transform(img, rng) -> (tensor, flipped)``."""
    d = cfg.data
    return TrainTransform(cfg.model.image_res, d.crop_scale_min, d.randaugment,
                          d.randaugment_n, d.randaugment_m)


def make_eval_transform(res: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to res x res (bicubic) and CLIP-normalise: PIL image -> tensor [3, res, res]."""
    def transform(img: Image.Image) -> torch.Tensor:
        img = TF.resize(img.convert("RGB"), [res, res], interpolation=InterpolationMode.BICUBIC)
        return _to_tensor(img)
    return transform
