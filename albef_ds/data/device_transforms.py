"""ALBEF's image pipeline on device tensors (``data.decode_on: device``): decode the raw bytes
(nvJPEG through ``torchvision.io.decode_jpeg`` on CUDA, libjpeg on CPU), then crop, flip,
RandAugment and normalise a whole batch where the ops allow it.

Loader workers only read bytes and draw each sample's :class:`~albef_ds.data.transforms.AugPlan`
from the per-sample RNG (dataset.py): the crop box, flip and RandAugment choices are the CPU
path's, draw for draw, so per-sample seeding and exact resume carry over unchanged. What runs
here is deterministic given the plan, and every op treats each sample on its own, so a sample's
pixels do not depend on which other samples share its batch.

The pixels are close to the PIL path's, not identical: the resize is ``interpolate(bicubic,
antialias=True)`` (PIL's kernel, a = -0.5, but float accumulation and rounding differ), the
geometric RandAugment ops are one ``grid_sample`` (bilinear, like PIL's, with a softer edge
where the image meets the grey fill), and nvJPEG's IDCT/chroma upsampling differs from
libjpeg's by a grey level or so. Equalize, a step function of the histogram, can turn those
+-1 level differences into steps of several levels on small crops. The per-op and
end-to-end bounds are stated in tests/data/test_device_transforms.py.

torchvision 0.29 deprecates its decoders (a DeprecationWarning per call) in favour of
TorchCodec. Decoding goes through :func:`decode_images` only, so a move is one function.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF2
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from albef_ds.data.transforms import CLIP_MEAN, CLIP_STD, FILL, MAX_LEVEL, RANDAUG_OPS, TRANSLATE_CONST_256

log = logging.getLogger(__name__)

#: JPEG's start-of-image marker: these blobs go through the batched decode_jpeg call.
JPEG_MAGIC = b"\xff\xd8\xff"
#: index of each op in the collated ``aug_ops`` tensor (-1: no op in that slot)
OP_INDEX = {name: i for i, name in enumerate(RANDAUG_OPS)}
_GEOMETRIC = tuple(OP_INDEX[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))


# ----------------------------------------------------------------------------- decode

def _is_jpeg(blob: torch.Tensor) -> bool:
    return blob.numel() >= 3 and bytes(blob[:3].tolist()) == JPEG_MAGIC


def _decode_one(blob: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """One image on its own: on the device for a JPEG, else on the CPU (PNG, WebP, a JPEG
    nvJPEG refuses, e.g. CMYK), then moved. None when nothing can read it."""
    if device.type == "cuda" and _is_jpeg(blob):
        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    try:
        img = decode_image(blob, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    if img.dtype != torch.uint8:  # a 16-bit PNG: scaled to the 8 bits the transforms work in
        img = TF2.to_dtype(img, torch.uint8, scale=True)
    return img.to(device)


def decode_images(blobs: Sequence[torch.Tensor], device) -> list[Optional[torch.Tensor]]:
    """Raw encoded images (uint8 CPU tensors) -> uint8 [3, H, W] RGB on ``device``; None for an
    image nothing can decode. The JPEGs go in one batched ``decode_jpeg`` call (on CUDA, one
    nvJPEG batch); if that call fails, each is retried on its own so one bad blob costs
    only itself. EXIF orientation is ignored, as the PIL path ignores it."""
    device = torch.device(device)
    out: list[Optional[torch.Tensor]] = [None] * len(blobs)
    jpeg = [i for i, b in enumerate(blobs) if _is_jpeg(b)]
    if jpeg:
        try:
            decoded = decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpeg, decoded):
                out[i] = img
        except RuntimeError as e:
            log.warning("batched decode_jpeg failed (%s); decoding one by one", e)
    for i, blob in enumerate(blobs):
        if out[i] is None:
            out[i] = _decode_one(blob, device)
    return out


# ----------------------------------------------------------------------------- pixel ops

def resize_u8(img: torch.Tensor, size: tuple) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> uint8 [..., 3, *size], bicubic with antialiasing (the PIL path's
    kernel), rounded back to uint8 as PIL's resize is, so RandAugment sees uint8 levels."""
    x = img.unsqueeze(0) if img.dim() == 3 else img
    y = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y[0] if img.dim() == 3 else y


def normalize(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, CLIP-normalised (the PIL path's to_tensor + normalize)."""
    mean = torch.tensor(CLIP_MEAN, device=x_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x_u8.device).view(1, 3, 1, 1)
    return (x_u8.float() / 255.0 - mean) / std


def affine_matrices(ops: torch.Tensor, signs: torch.Tensor, level: float, size: int) -> torch.Tensor:
    """[k] op indices (geometric ones) and signs -> [k, 2, 3] output-to-input maps in pixel
    coordinates (pixel centres at i + 0.5): the matrices the PIL path hands to
    ``Image.transform`` / ``Image.rotate`` (transforms.py), so both move content alike."""
    frac = level / MAX_LEVEL
    k = ops.shape[0]
    m = torch.zeros(k, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    s = signs.double().cpu()
    ops = ops.cpu()
    half = size / 2
    shear, shift = s * frac * 0.3, s * frac * TRANSLATE_CONST_256 * size / 256.0
    sel = ops == OP_INDEX["ShearX"]
    m[sel, 0, 1], m[sel, 0, 2] = shear[sel], -shear[sel] * half
    sel = ops == OP_INDEX["ShearY"]
    m[sel, 1, 0], m[sel, 1, 2] = shear[sel], -shear[sel] * half
    sel = ops == OP_INDEX["TranslateX"]
    m[sel, 0, 2] = -shift[sel]
    sel = ops == OP_INDEX["TranslateY"]
    m[sel, 1, 2] = -shift[sel]
    sel = ops == OP_INDEX["Rotate"]
    # PIL's rotate: the inverse rotation by -angle about the centre (Image.rotate's matrix)
    a = -(s[sel] * frac * 30.0) * math.pi / 180.0
    cos, sin = torch.cos(a), torch.sin(a)
    m[sel, 0, 0], m[sel, 0, 1], m[sel, 1, 0], m[sel, 1, 1] = cos, sin, -sin, cos
    m[sel, 0, 2] = cos * -half + sin * -half + half
    m[sel, 1, 2] = -sin * -half + cos * -half + half
    return m.float()


def warp_affine(x_u8: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """uint8 [k, 3, S, S], [k, 2, 3] output-to-input maps -> uint8, bilinear, grey fill
    outside the image: one grid_sample for the whole group. The image is shifted by the fill
    value so grid_sample's zero padding is the fill."""
    k, _, h, w = x_u8.shape
    dev = x_u8.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev) + 0.5, torch.arange(w, device=dev) + 0.5, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).float()      # [S, S, 3]
    src = torch.einsum("hwc,kdc->khwd", pts, mats.to(dev))              # input (x, y) per output pixel
    grid = src / torch.tensor([w, h], device=dev, dtype=torch.float32) * 2 - 1
    fill = torch.tensor(FILL, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    y = F.grid_sample(x_u8.float() - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (y + fill).round_().clamp_(0, 255).to(torch.uint8)


def apply_op_group(x_u8: torch.Tensor, op: int, level: float) -> torch.Tensor:
    """A non-geometric RandAugment op on a group of samples (its factor is the same for all:
    it depends only on the magnitude). Matches PIL's ImageOps/ImageEnhance (torchvision
    implements them after PIL)."""
    name = RANDAUG_OPS[op]
    factor = level / MAX_LEVEL * 1.8 + 0.1
    if name == "Identity":
        return x_u8
    if name == "AutoContrast":
        return TF2.autocontrast(x_u8)
    if name == "Equalize":
        return TF2.equalize(x_u8)
    if name == "Brightness":
        return TF2.adjust_brightness(x_u8, factor)
    if name == "Sharpness":
        return TF2.adjust_sharpness(x_u8, factor)
    raise ValueError(f"not a per-group RandAugment op: {name}")


def rand_augment(x_u8: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, level: float) -> torch.Tensor:
    """Each sample's RandAugment ops (``ops`` [B, n], -1 for an empty slot; ``signs`` [B, n]),
    slot by slot: per slot, the samples sharing an op are processed together and all
    geometric ops in one warp."""
    x = x_u8.clone()
    ops_cpu, signs_cpu = ops.cpu(), signs.cpu()
    for j in range(ops_cpu.shape[1]):
        col = ops_cpu[:, j]
        geo = torch.isin(col, torch.tensor(_GEOMETRIC)).nonzero().flatten()
        if geo.numel():
            mats = affine_matrices(col[geo], signs_cpu[geo, j], level, x.shape[-1])
            idx = geo.to(x.device)
            x[idx] = warp_affine(x[idx], mats)
        for op in col.unique().tolist():
            if op < 0 or op in _GEOMETRIC or RANDAUG_OPS[op] == "Identity":
                continue
            idx = (col == op).nonzero().flatten().to(x.device)
            x[idx] = apply_op_group(x[idx], op, level)
    return x


# ----------------------------------------------------------------------------- transforms

class DeviceTrainTransform:
    """The train transform of transforms.TrainTransform on a batch of decoded tensors: each
    sample's plan (collated by collate.py: ``aug_box`` [B, 4] top/left/h/w, ``aug_flip`` [B],
    ``aug_ops`` / ``aug_sign`` [B, n]) applied with tensor ops."""

    def __init__(self, res: int, randaugment_m: int = 7):
        self.res, self.level = res, float(randaugment_m)

    def __call__(self, images: Sequence[torch.Tensor], box: torch.Tensor, flip: torch.Tensor,
                 ops: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H_i, W_i] images on one device -> float32 [B, 3, res, res] there."""
        crops = []
        for img, (top, left, h, w) in zip(images, box.tolist()):
            # crops differ in size: resized one by one, then everything else is batched
            crops.append(resize_u8(img[:, top:top + h, left:left + w], (self.res, self.res)))
        x = torch.stack(crops)
        flip = flip.to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        if ops.numel():
            x = rand_augment(x, ops, signs, self.level)
        return normalize(x)


class DeviceEvalTransform:
    """transforms.make_eval_transform on a tensor: resize to res x res (bicubic, antialiased)
    and CLIP-normalise. uint8 [3, H, W] -> float32 [3, res, res]."""

    def __init__(self, res: int):
        self.res = res

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return normalize(resize_u8(img, (self.res, self.res)).unsqueeze(0))[0]


def grey_image(res: int, device) -> torch.Tensor:
    """The stand-in for an image nothing could decode (flagged ``skipped``): the fill grey."""
    return torch.tensor(FILL, dtype=torch.uint8, device=device).view(3, 1, 1).expand(3, res, res)


def finish_batch(batch: dict, transform: DeviceTrainTransform, device) -> dict:
    """A collated device-path batch (``image_bytes`` and the ``aug_*`` plan tensors) -> the
    batch the CPU path yields: ``image`` float32 [B, 3, R, R] on ``device`` first (streaming
    and the trainer count a batch by its first entry), the rest unchanged. A sample whose
    bytes decode nowhere gets a grey image and ``skipped`` = 1 (the worker already replaced
    records whose header it could not read, as the CPU path does)."""
    device = torch.device(device)
    rest = dict(batch)
    blobs = rest.pop("image_bytes")
    plan = [rest.pop(k) for k in ("aug_box", "aug_flip", "aug_ops", "aug_sign")]
    images = decode_images(blobs, device)
    bad = [i for i, img in enumerate(images) if img is None]
    if bad:
        keys = rest.get("key")
        log.warning("undecodable images in the batch (grey stand-ins, skipped=1): %s",
                    [keys[i] for i in bad] if keys else bad)
        skipped = rest["skipped"].clone()
        skipped[bad] = 1
        rest["skipped"] = skipped
        box = plan[0].clone()
        for i in bad:  # the stand-in is res x res: crop all of it
            box[i] = torch.tensor([0, 0, transform.res, transform.res])
            images[i] = grey_image(transform.res, device)
        plan[0] = box
    return {"image": transform(images, *plan), **rest}
