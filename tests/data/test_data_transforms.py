"""ALBEF's transforms and caption cleaning."""
import random

import torch
from PIL import Image, ImageDraw

from albef_ds.config import Config
from albef_ds.data import clean_caption, make_eval_transform, make_train_transform, swap_left_right
from albef_ds.data.dataset import sample_rng
from albef_ds.data.transforms import RANDAUG_OPS, _apply_op, crop_params


def picture():
    im = Image.new("RGB", (80, 60), (110, 110, 110))
    d = ImageDraw.Draw(im)
    d.rectangle([5, 20, 25, 40], fill=(220, 30, 30))    # red on the left
    d.ellipse([55, 20, 75, 40], fill=(40, 70, 230))     # blue on the right
    return im


def test_clean_caption_as_albef():
    assert clean_caption("A Dog's  ball, (red)!  jumps-high/low <person>", 30) == "a dogs ball red jumps high low person"
    assert clean_caption(" one two three four ", 2) == "one two"
    assert clean_caption("...", 5) == ""


def test_swap_left_right_whole_words():
    assert swap_left_right("a red circle to the left of a square on the right") == \
        "a red circle to the right of a square on the left"
    assert swap_left_right("leftover bright") == "leftover bright"


def test_train_transform_deterministic_per_sample_seed():
    cfg = Config()
    cfg.model.image_res = 48
    t = make_train_transform(cfg)
    a, fa = t(picture(), sample_rng(1, 0, 17))
    b, fb = t(picture(), sample_rng(1, 0, 17))
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b) and fa == fb
    others = [t(picture(), sample_rng(1, e, i))[0] for e, i in ((1, 17), (0, 18), (2, 3))]
    assert all(not torch.equal(a, o) for o in others)


def test_flip_moves_content_and_is_reported():
    cfg = Config()
    cfg.model.image_res = 32
    cfg.data.crop_scale_min = 1.0
    cfg.data.randaugment = False
    t = make_train_transform(cfg)
    seen = set()
    for i in range(40):
        x, flipped = t(picture(), sample_rng(0, 0, i))
        red = x[0] - x[2]  # red minus blue channel: positive where the red square is
        left_half_red = red[:, :16].max() > red[:, 16:].max()
        assert left_half_red != flipped
        seen.add(flipped)
    assert seen == {True, False}


def test_randaugment_has_no_colour_op_and_every_op_runs():
    assert set(RANDAUG_OPS) == {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                                "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
    img = picture()
    for op in RANDAUG_OPS:
        out = _apply_op(img, op, 7.0, random.Random(0))
        assert out.size == img.size and out.mode == "RGB"


def test_crop_params_inside_image():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = crop_params(80, 60, (0.2, 1.0), rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert h * w >= 0.19 * 80 * 60 or (h, w) in ((60, 80), (60, 64), (60, 80))


def test_eval_transform():
    x = make_eval_transform(40)(picture())
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
