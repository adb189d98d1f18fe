"""``albef-data synth``: a procedural image-caption dataset, deterministic by seed.

Each image is one of three scenes drawn with PIL on a plain or gradient background:

- *single*: one large or small shape ("a large red circle on a gray background");
- *relation*: two shapes side by side or stacked ("a red circle to the left of a blue
  square", "a blue square below a red circle");
- *count*: two to four equal shapes ("three green triangles").

Every scene has several paraphrased captions. Matching a caption to its image needs the
content: the same shapes appear in other colours, counts and relations (hard negatives),
and swapping left/right or above/below changes the answer. Shapes are large and saturated
so that a tiny ViT at 64 px can learn them. Relations use only the words left/right/above/
below, so a horizontal flip that swaps "left" and "right" keeps captions true.

Layout of OUT:
  train/         MDS parts + index.json + manifest.parquet + stats.json (the convert writer)
  val.json       [{"image": "images/val_00000.png", "caption": [5 captions], "image_id": 0}, ...]
  test.json      same for the test split
  compositional.json  [{"image": "images/comp_00000.png", "image_id": 0, "captions": [true, 3
                 binding-swapped distractors], "kinds": [...]}, ...] (data_tools/compositional.py)
  images/        the val/test and compositional images (PNG)
  captions.txt   every train caption, one per line (input of build-vocab)
  synth.json     the options used

Image ``i`` of a split is drawn from ``random.Random(f"{seed}:{split}:{i}")``, so the
output does not depend on the number of worker processes.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from data_tools.records import Pair, sha1_hex

#: saturated, well separated colours (names as they appear in captions)
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (245, 220, 30),
    "purple": (150, 50, 200), "orange": (250, 140, 20), "white": (245, 245, 245),
}
#: backgrounds dark or mid-grey enough for every shape colour to stand out
BACKGROUNDS = {"gray": (110, 110, 110), "black": (20, 20, 20), "brown": (90, 60, 40)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
SIZES = {"small": 0.22, "large": 0.42}  # shape extent as a fraction of the image side
#: scene mix (single, relation, count)
SCENE_WEIGHTS = (0.3, 0.45, 0.25)
#: images per unit of work (and per MDS part)
IMAGES_PER_PART = 2000


@dataclass
class SynthOptions:
    out: str
    seed: int = 0
    num_train: int = 20_000
    train_captions_per_image: int = 1
    num_val: int = 500
    num_test: int = 1000
    captions_per_image: int = 5
    #: images of the compositional test (0: no compositional.json)
    num_compositional: int = 500
    image_size: int = 64
    workers: int = 1
    progress: bool = True


# ----------------------------------------------------------------------------- drawing

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 1.05, cy + r * 0.8), (cx - r * 1.05, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.1), (cx + r, cy), (cx, cy + r * 1.1), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(shape)


def _background(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    name = rng.choice(list(BACKGROUNDS))
    base = BACKGROUNDS[name]
    im = Image.new("RGB", (size, size), base)
    if rng.random() < 0.5:  # a gentle gradient, so backgrounds vary within a name
        delta = rng.randint(-30, 30)
        vertical = rng.random() < 0.5
        draw = ImageDraw.Draw(im)
        for t in range(size):
            c = tuple(max(0, min(255, int(v + delta * (t / (size - 1) - 0.5)))) for v in base)
            draw.line([(0, t), (size, t)] if vertical else [(t, 0), (t, size)], fill=c)
    return im, name


def _thing(colour: str, shape: str, size: str | None = None) -> str:
    return " ".join(w for w in (size, colour, shape) if w)


def _object(colour: str, shape: str, cx: float, cy: float, r: float, size: str | None = None) -> dict:
    """One drawn shape as the task generator sees it; the box bounds every shape's drawing."""
    extent = r * 1.1  # the diamond's height and the triangle's width reach 1.05-1.1 r
    return {"colour": colour, "shape": shape, "size": size,
            "box": [round(cx - extent, 2), round(cy - extent, 2), round(2 * extent, 2), round(2 * extent, 2)]}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _scene_single(rng, draw, S):
    colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))
    r = SIZES[size] * S / 2
    cx, cy = rng.uniform(r + 2, S - r - 2), rng.uniform(r + 2, S - r - 2)
    _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    facts = {"scene": "single", "objects": [_object(colour, shape, cx, cy, r, size)]}
    big = {"small": "little", "large": "big"}[size]
    t = _thing(colour, shape, size)
    return facts, [_article(t), f"there is one {t}", f"{_article(_thing(colour, shape, big))} in the picture",
            f"a single {colour} {shape}, {size}", f"an image of one {t}",
            f"one {size} {shape} colored {colour}", f"the picture shows {_article(t)}"]


def draw_pair(rng, draw, S, a: tuple[str, str], b: tuple[str, str], horizontal: bool) -> dict:
    """Draw (colour, shape) ``a`` left of (``horizontal``) or above ``b``; their facts.
    Shared by the relation scene and the compositional test (data_tools/compositional.py),
    so both place shapes alike; the rng calls are those the relation scene always made."""
    r = 0.28 * S / 2
    lo, hi = r + 2, S - r - 2
    # a in the first half (left or top), b in the second, never touching along the relation
    along_a, along_b = rng.uniform(lo, S / 2 - r - 1), rng.uniform(S / 2 + r + 1, hi)
    across_a, across_b = rng.uniform(lo, hi), rng.uniform(lo, hi)
    pa, pb = ((along_a, across_a), (along_b, across_b)) if horizontal else \
        ((across_a, along_a), (across_b, along_b))
    _draw_shape(draw, a[1], *pa, r, COLOURS[a[0]])
    _draw_shape(draw, b[1], *pb, r, COLOURS[b[0]])
    # objects[0] is left of (horizontal) or above objects[1]
    return {"scene": "relation", "relation": "left" if horizontal else "above",
            "objects": [_object(*a, *pa, r), _object(*b, *pb, r)]}


def _scene_relation(rng, draw, S):
    a = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    while True:
        b = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if b != a:
            break
    horizontal = rng.random() < 0.5
    facts = draw_pair(rng, draw, S, a, b, horizontal)
    ta, tb = _thing(*a), _thing(*b)
    if horizontal:
        return facts, [f"{_article(ta)} to the left of {_article(tb)}", f"{_article(tb)} to the right of {_article(ta)}",
                f"on the left {_article(ta)}, on the right {_article(tb)}",
                f"{_article(tb)} is right of {_article(ta)}", f"{_article(ta)} is left of {_article(tb)}",
                f"{_article(ta)} and {_article(tb)}, the {a[1] if a[1] != b[1] else a[0] + ' one'} on the left"]
    return facts, [f"{_article(ta)} above {_article(tb)}", f"{_article(tb)} below {_article(ta)}",
            f"{_article(ta)} on top, {_article(tb)} at the bottom", f"{_article(tb)} is under {_article(ta)}",
            f"{_article(ta)} is over {_article(tb)}",
            f"{_article(ta)} and {_article(tb)}, the {a[1] if a[1] != b[1] else a[0] + ' one'} above"]


def _scene_count(rng, draw, S):
    colour, shape, n = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(NUMBERS))
    cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], n)  # a 2x2 grid: never overlapping
    r = 0.2 * S / 2
    facts = {"scene": "count", "objects": []}
    for gx, gy in cells:
        cx = rng.uniform(gx * S / 2 + r + 2, (gx + 1) * S / 2 - r - 2)
        cy = rng.uniform(gy * S / 2 + r + 2, (gy + 1) * S / 2 - r - 2)
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        facts["objects"].append(_object(colour, shape, cx, cy, r))
    word, many = NUMBERS[n], PLURAL[shape]
    return facts, [f"{word} {colour} {many}", f"there are {word} {colour} {many}", f"{n} {colour} {many}",
            f"a group of {word} {colour} {many}", f"{word} {many}, all {colour}",
            f"exactly {word} {many} colored {colour}"]


def draw_example(seed: int, split: str, index: int, size: int) -> tuple[bytes, list[str]]:
    """The PNG bytes and paraphrased captions of image ``index`` of ``split``."""
    png, captions, _ = draw_scene(seed, split, index, size)
    return png, captions


def draw_scene(seed: int, split: str, index: int, size: int) -> tuple[bytes, list[str], dict]:
    """:func:`draw_example` plus what the picture holds: ``{"scene": single|relation|count,
    "background": name, "objects": [{"colour", "shape", "size", "box": [x, y, w, h]}, ...],
    "relation": left|above}`` (relation scenes: objects[0] is left of / above objects[1]).
    Boxes are in pixels of the ``size`` x ``size`` image. The downstream-task generator
    (data_tools/synth_tasks.py) derives questions, labels and referring expressions from it."""
    rng = random.Random(f"{seed}:{split}:{index}")
    im, bg = _background(rng, size)
    draw = ImageDraw.Draw(im)
    scene = rng.choices((_scene_single, _scene_relation, _scene_count), SCENE_WEIGHTS)[0]
    facts, captions = scene(rng, draw, size)
    facts["background"] = bg
    # some paraphrases also name the background
    captions = [c + f" on a {bg} background" if rng.random() < 0.3 else c for c in captions]
    rng.shuffle(captions)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), captions, facts


# ----------------------------------------------------------------------------- splits

def _train_unit(args) -> tuple[dict, list[str]]:
    from data_tools.writer import PartWriter

    opts, part, start, stop = args
    writer = PartWriter(os.path.join(opts.out, "train"), f"part-{part:06d}")
    captions_out = []
    try:
        for i in range(start, stop):
            png, caps = draw_example(opts.seed, "train", i, opts.image_size)
            digest = sha1_hex(png)
            for j, cap in enumerate(caps[: opts.train_captions_per_image]):
                writer.add(Pair(key=f"synth/{i:08d}_{j}", source="synth", caption=cap, image=png,
                                width=opts.image_size, height=opts.image_size, sha1=digest))
                captions_out.append(cap)
        return writer.commit(), captions_out
    except BaseException:
        writer.abort()
        raise


def _eval_image(args) -> dict:
    opts, split, i = args
    png, caps = draw_example(opts.seed, split, i, opts.image_size)
    rel = f"images/{split}_{i:05d}.png"
    with open(os.path.join(opts.out, rel), "wb") as f:
        f.write(png)
    return {"image": rel, "caption": caps[: opts.captions_per_image], "image_id": i}


def synth(opts: SynthOptions) -> dict:
    """Write the dataset; returns a small summary."""
    from tqdm import tqdm

    from data_tools import compositional
    from data_tools.merge import merge
    import streaming  # noqa: F401  (imported once here, inherited by forked workers)

    if opts.captions_per_image > 6 or opts.train_captions_per_image > 6:
        raise ValueError("at most 6 paraphrases exist per image")
    start = time.time()
    if os.path.exists(opts.out):
        shutil.rmtree(opts.out)  # a fresh, deterministic folder every time
    os.makedirs(os.path.join(opts.out, "train"))
    os.makedirs(os.path.join(opts.out, "images"))
    jobs = [(opts, p, s, min(s + IMAGES_PER_PART, opts.num_train))
            for p, s in enumerate(range(0, opts.num_train, IMAGES_PER_PART))]
    eval_jobs = {split: [(opts, split, i) for i in range(n)]
                 for split, n in (("val", opts.num_val), ("test", opts.num_test))}
    workers = max(1, min(opts.workers, os.cpu_count() or 1))
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        train = []
        for stats_caps in tqdm(pool.imap(_train_unit, jobs), total=len(jobs), desc="synth train",
                               unit="part", disable=not opts.progress):
            train.append(stats_caps)
        splits = {s: pool.map(_eval_image, j, chunksize=64) for s, j in eval_jobs.items()}
        comp = pool.map(compositional.write_image,
                        [(opts.out, opts.seed, i, opts.image_size) for i in range(opts.num_compositional)],
                        chunksize=64)
    with open(os.path.join(opts.out, "captions.txt"), "w", encoding="utf-8") as f:
        for _, caps in train:  # imap keeps part order: deterministic file
            f.writelines(c + "\n" for c in caps)
    for split, entries in splits.items():
        with open(os.path.join(opts.out, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=0)
    if opts.num_compositional:
        with open(os.path.join(opts.out, compositional.FILE), "w", encoding="utf-8") as f:
            json.dump(comp, f, indent=0)
    if opts.num_train:
        merge(os.path.join(opts.out, "train"), quiet=True)
    with open(os.path.join(opts.out, "synth.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in asdict(opts).items() if k not in ("out", "workers", "progress")}, f, indent=1)
    summary = {"train_pairs": sum(s["kept"] for s, _ in train), "val_images": opts.num_val,
               "test_images": opts.num_test, "compositional_images": opts.num_compositional,
               "seconds": round(time.time() - start, 2)}
    print(f"synth: {summary['train_pairs']} train pairs, {opts.num_val} val and {opts.num_test} test "
          f"images, {opts.num_compositional} compositional test images in {opts.out} "
          f"({summary['seconds']}s)", file=sys.stderr)
    return summary
