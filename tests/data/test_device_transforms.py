"""data.decode_on: device (albef_ds/data/device_transforms.py), run on the CPU: the same
contract as the PIL path (tests/data/test_data_loader.py, test_data_transforms.py): shapes,
dtype, value ranges, per-sample seeding independent of batch and worker count, flip swaps
caption words, exact resume; and closeness to the PIL path, with the bounds stated here."""
import io
import os

import pytest
import torch
from PIL import Image, ImageDraw

from albef_ds.config import Config, ConfigError
from albef_ds.data import CLIP_MEAN, CLIP_STD, build_train_loader, make_eval_transform
from albef_ds.data.collate import device_plan
from albef_ds.data.dataset import sample_rng
from albef_ds.data.device_transforms import (OP_INDEX, DeviceEvalTransform, DeviceTrainTransform, decode_images,
                                             finish_batch, rand_augment)
from albef_ds.data.transforms import RANDAUG_OPS, TrainTransform, _apply_signed
from albef_ds.tokenizer import load_tokenizer
from data_tools.records import Pair, sha1_hex
from data_tools.writer import PartWriter
from tests.support.loaders import make_cfg as loader_cfg

#: a real photograph shipped with matplotlib (600 x 512 JPEG)
PHOTO = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
#: grey levels (0-255) per normalised unit, per channel
LEVELS = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
LO, HI = (0 - max(CLIP_MEAN)) / min(CLIP_STD), (1 - min(CLIP_MEAN)) / min(CLIP_STD)


def _blob(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def picture():  # test_data_transforms.picture: red on the left, blue on the right
    im = Image.new("RGB", (80, 60), (110, 110, 110))
    d = ImageDraw.Draw(im)
    d.rectangle([5, 20, 25, 40], fill=(220, 30, 30))
    d.ellipse([55, 20, 75, 40], fill=(40, 70, 230))
    return im


def _u8(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def _device_batch(t: TrainTransform, blobs, sizes, seeds, device="cpu"):
    """What a worker + collate produce for these blobs, finished as the loader finishes it."""
    samples = [{"image_bytes": b, "aug": t.plan(w, h, sample_rng(*s))} for b, (w, h), s in zip(blobs, sizes, seeds)]
    batch = {**device_plan(samples), "key": [str(s) for s in seeds],
             "skipped": torch.zeros(len(blobs), dtype=torch.int64)}
    return finish_batch(batch, DeviceTrainTransform(t.res, t.m), device)


# ----------------------------------------------------------------------------- ops and transforms

def test_decode_jpeg_and_png_as_pil_does():
    photo = Image.open(PHOTO).convert("RGB")
    small = picture()
    out = decode_images([_blob(open(PHOTO, "rb").read()), _blob(_encoded(small, "PNG")),
                         _blob(_encoded(small.convert("L"), "JPEG"))], "cpu")
    assert torch.equal(out[0], _u8(photo))       # libjpeg-turbo on both sides: identical
    assert torch.equal(out[1], _u8(small))       # PNG: lossless
    assert out[2].shape == (3, 60, 80)           # greyscale JPEG comes back as RGB
    assert decode_images([_blob(b"not an image at all")], "cpu") == [None]


@pytest.mark.parametrize("op", RANDAUG_OPS)
def test_each_randaugment_op_matches_pil(op):
    img = Image.open(PHOTO).convert("RGB").resize((64, 64))
    for sign in (1.0, -1.0):
        ref = _u8(_apply_signed(img, op, 7.0, sign)).float()
        out = rand_augment(_u8(img)[None], torch.tensor([[OP_INDEX[op]]]), torch.tensor([[sign]]), 7.0)[0]
        d = (out.float() - ref).abs()
        if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            # same matrix and bilinear kernel; differences sit where the image meets the fill
            assert d.mean() < 1.5 and (d > 2).float().mean() < 0.03, (op, sign, d.mean())
        else:
            assert d.max() <= 1, (op, d.max())  # torchvision's ops follow PIL's, up to rounding


def test_eval_transform_agrees_with_pil_on_a_photo():
    """Augmentation off: mean |difference| 0.14 grey levels of 255 at 256 px (0.07 at 64),
    at most 5 levels on any pixel: the bicubic kernels are the same (a = -0.5, antialiased),
    the arithmetic and rounding are not."""
    photo = Image.open(PHOTO)
    dec = decode_images([_blob(open(PHOTO, "rb").read())], "cpu")[0]
    for res in (256, 64):
        a, b = make_eval_transform(res)(photo), DeviceEvalTransform(res)(dec)
        assert a.shape == b.shape == (3, res, res) and b.dtype == torch.float32
        d = ((a - b) * LEVELS).abs()
        assert d.mean() < 0.5 and d.max() <= 8, (res, d.mean(), d.max())


def test_train_transform_follows_the_cpu_plan_closely():
    """Same seed, same plan: the device path's crop, flip and ops are the CPU path's, so the
    pictures agree to a grey level or two on average (mean |diff| 0.16 levels without
    RandAugment, at most ~1 with it: the geometric ops' edges)."""
    photo = Image.open(PHOTO).convert("RGB")
    blob = _blob(open(PHOTO, "rb").read())
    for randaugment, bound in ((False, 0.5), (True, 2.0)):
        t = TrainTransform(64, 0.5, randaugment, 2, 7)
        seeds = [(3, 0, i) for i in range(12)]
        dev = _device_batch(t, [blob] * 12, [photo.size] * 12, seeds)["image"]
        for k, s in enumerate(seeds):
            ref, _ = t(photo, sample_rng(*s))
            d = ((ref - dev[k]) * LEVELS).abs().mean()
            assert d < bound, (randaugment, s, d)


def test_shapes_dtype_and_range_after_normalisation():
    t = TrainTransform(48, 0.2, True, 2, 7)
    raw = _encoded(Image.open(PHOTO).convert("RGB").resize((90, 70)), "JPEG")
    x = _device_batch(t, [_blob(raw)] * 5, [(90, 70)] * 5, [(1, 0, i) for i in range(5)])["image"]
    assert x.shape == (5, 3, 48, 48) and x.dtype == torch.float32
    assert x.min() >= LO - 1e-5 and x.max() <= HI + 1e-5
    assert x.std() > 0.1  # not a constant image


def test_per_sample_result_independent_of_the_batch():
    t = TrainTransform(40, 0.2, True, 2, 7)
    photo = Image.open(PHOTO).convert("RGB")
    blobs = [_blob(_encoded(photo.resize((60 + 7 * i, 50 + 5 * i)), "JPEG")) for i in range(6)]
    sizes = [(60 + 7 * i, 50 + 5 * i) for i in range(6)]
    seeds = [(9, 2, 100 + i) for i in range(6)]
    full = _device_batch(t, blobs, sizes, seeds)["image"]
    order = [4, 1, 5, 0]
    part = _device_batch(t, [blobs[i] for i in order], [sizes[i] for i in order], [seeds[i] for i in order])["image"]
    for k, i in enumerate(order):
        assert torch.equal(part[k], full[i])
    alone = _device_batch(t, [blobs[3]], [sizes[3]], [seeds[3]])["image"]
    assert torch.equal(alone[0], full[3])
    other = _device_batch(t, [blobs[3]], [sizes[3]], [(9, 3, 103)])["image"]  # another epoch
    assert not torch.equal(other[0], full[3])


def test_flip_moves_content_as_the_plan_says():
    t = TrainTransform(32, 1.0, False, 2, 7)
    raw = _blob(_encoded(picture(), "PNG"))
    seeds = [(0, 0, i) for i in range(40)]
    batch_x = _device_batch(t, [raw] * 40, [(80, 60)] * 40, seeds)["image"]
    seen = set()
    for x, s in zip(batch_x, seeds):
        flipped = t.plan(80, 60, sample_rng(*s)).flip
        assert flipped == t(picture(), sample_rng(*s))[1]  # the CPU path's flip
        red = x[0] - x[2]
        assert (red[:, :16].max() > red[:, 16:].max()) != flipped
        seen.add(flipped)
    assert seen == {True, False}


def test_undecodable_bytes_become_a_flagged_grey_image():
    t = TrainTransform(32, 0.5, True, 2, 7)
    good = _blob(_encoded(picture(), "PNG"))
    b = _device_batch(t, [good, _blob(b"\x89PNG\r\n\x1a\n broken")], [(80, 60), (80, 60)], [(0, 0, 0), (0, 0, 1)])
    assert b["skipped"].tolist() == [0, 1] and list(b)[0] == "image"
    assert b["image"].shape == (2, 3, 32, 32)


def test_decode_on_is_checked_naming_the_key(synth_small):
    cfg = Config()
    cfg.data.decode_on = "gpu"
    with pytest.raises(ConfigError, match="data.decode_on"):
        cfg.validate()
    data, tok = synth_small
    cfg.data.train_dirs = [str(data / "train")]
    with pytest.raises(ValueError, match="data.decode_on"):
        build_train_loader(cfg, load_tokenizer(tok), 0, 1)


# ----------------------------------------------------------------------------- the loader

def make_cfg(dirs, decode_on, **kwargs):
    return loader_cfg(dirs, flip_swaps_left_right=True, decode_on=decode_on, **kwargs)


def _by_key(loader):
    out = {}
    for b in loader:
        for k, key in enumerate(b["key"]):
            out[key] = (b["image"][k], b["text_ids"][k])
    return out


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    """48 JPEG pairs of varied sizes cut from the photo, captions naming left and right."""
    out = tmp_path_factory.mktemp("jpeg") / "train"
    os.makedirs(out)
    photo = Image.open(PHOTO).convert("RGB")
    w = PartWriter(str(out), "part-000000")
    for i in range(48):
        img = _encoded(photo.crop((i * 3, i * 2, i * 3 + 200 + i, i * 2 + 160)).resize((64 + i, 48 + i)), "JPEG")
        w.add(Pair(key=f"photo/{i}", source="photo", caption=f"a woman on the left of picture {i}", image=img,
                   width=64 + i, height=48 + i, sha1=sha1_hex(img)))
    w.commit()
    from data_tools.merge import merge
    merge(str(out), quiet=True)
    return out


def test_batch_contract_on_the_device_path(synth_small, jpeg_dir):
    data, tok_dir = synth_small
    tok = load_tokenizer(tok_dir)
    for d, n in ((data / "train", 256 // 8), (jpeg_dir, 48 // 8)):  # PNG (synth), JPEG
        count = 0
        for b in build_train_loader(make_cfg([d], "device"), tok, 0, 1, device="cpu"):
            assert list(b)[:5] == ["image", "text_ids", "text_mask", "image_id", "key"]
            assert not any(k.startswith("aug_") or k == "image_bytes" for k in b)
            assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
            assert b["text_ids"].shape == (8, 16) and b["text_ids"].dtype == torch.int64
            assert b["image"].min() >= LO - 1e-5 and b["image"].max() <= HI + 1e-5
            assert b["skipped"].sum() == 0
            count += 1
        assert count == n


def test_device_loader_matches_the_cpu_loader(jpeg_dir, synth_small):
    """Same keys, same captions (flip swaps left/right from the same plan), pictures close;
    and the device path's pixels do not depend on the number of workers."""
    _, tok_dir = synth_small
    tok = load_tokenizer(tok_dir)
    cpu = _by_key(build_train_loader(make_cfg([jpeg_dir], "cpu"), tok, 0, 1))
    dev0 = _by_key(build_train_loader(make_cfg([jpeg_dir], "device"), tok, 0, 1, device="cpu"))
    dev1 = _by_key(build_train_loader(make_cfg([jpeg_dir], "device", workers=1), tok, 0, 1, device="cpu"))
    assert set(cpu) == set(dev0) == set(dev1) and len(cpu) == 48
    swapped, diffs = 0, []
    for key, (img, ids) in cpu.items():
        assert torch.equal(dev0[key][1], ids)                                # the same caption
        assert torch.equal(dev0[key][0], dev1[key][0]) and torch.equal(dev1[key][1], ids)
        diffs.append(((dev0[key][0] - img) * LEVELS).abs().mean().item())
        swapped += int("right" in tok.decode(ids.tolist()))
    assert 0 < swapped < 48  # some flipped (caption swapped), some not
    # Mostly under a grey level; Equalize turns the resize's +-1 level differences into
    # histogram steps on these 32 px crops (up to ~11 levels mean on such a sample).
    assert sum(diffs) / len(diffs) < 3.0 and max(diffs) < 16, sorted(diffs)[-5:]


def test_exact_resume_on_the_device_path(synth_small):
    data, tok_dir = synth_small
    tok = load_tokenizer(tok_dir)
    stop = 5
    loader = build_train_loader(make_cfg([data / "train"], "device"), tok, 0, 1, device="cpu")
    full, state = [], None
    for i, b in enumerate(loader):
        full.append(b)
        if i + 1 == stop:
            state = loader.state_dict()
    assert state["sample_in_epoch"] == stop * 8
    fresh = build_train_loader(make_cfg([data / "train"], "device"), tok, 0, 1, device="cpu")
    fresh.load_state_dict(state)
    tail = list(fresh)
    assert len(tail) == len(full) - stop
    for a, b in zip(tail, full[stop:]):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_ids"], b["text_ids"])


def test_speed_script_runs_both_paths(capsys):
    from albef_ds.data.speed import main
    threads = torch.get_num_threads()
    try:
        assert main(["--samples", "4", "--batch", "2", "--res", "32"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() pins one thread for the measurement
    lines = [__import__("json").loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in lines] == ["cpu", "device", "worker"]
    assert all(r["pairs_per_cpu_s"] > 0 and r["torch_threads"] == 1 for r in lines)
