"""The compositional test written by ``albef-data synth`` (OUT/compositional.json).

Each image is a relation scene of two shapes that differ in colour AND in shape. Beside its
true caption it has three distractors made of exactly the same words, with the binding of
words to objects swapped:

- ``colour_swap``:   "a blue circle to the left of a red square"
- ``shape_swap``:    "a red square to the left of a blue circle"
- ``relation_swap``: "a blue square to the left of a red circle" (the objects swapped)

for the true "a red circle to the left of a blue square". A model that sees a caption as a
bag of words scores the four alike, so it is at chance (1/4) by construction; picking the
true one needs the binding, which is what a fusion encoder is for.

Each relation has ONE caption template, the relation scene's first train paraphrase
("X to the left of Y", "X above Y"), so the model has seen the wording in training. One
template matters: "Y to the right of X" is true whenever "X to the left of Y" is, so a
distractor written with a second template could be true of the image. Every distractor is
checked false against the scene's facts (and the true caption true) when it is made.

Image ``i`` is drawn from ``random.Random(f"{seed}:compositional:{i}")``: a stream of its
own, so adding this file changed none of synth's train/val/test bytes.
"""
from __future__ import annotations

import io
import os
import random

from PIL import ImageDraw

from data_tools.synth import COLOURS, SHAPES, _article, _background, _thing, draw_pair

#: candidate order in every entry: the true caption first, then one distractor per swap
KINDS = ("true", "colour_swap", "shape_swap", "relation_swap")
#: one template per relation (see the module doc for why one): the train captions' wording
TEMPLATES = {"left": "{0} to the left of {1}", "above": "{0} above {1}"}
FILE = "compositional.json"


def caption(statement: tuple) -> str:
    """``((colour, shape), relation, (colour, shape))`` -> its one caption."""
    first, relation, second = statement
    return TEMPLATES[relation].format(_article(_thing(*first)), _article(_thing(*second)))


def is_true(statement: tuple, facts: dict) -> bool:
    """Whether the scene of ``facts`` (draw_pair's: objects[0] left of / above objects[1])
    holds "first <relation> second". Only the scene's own relation can be judged: two shapes
    side by side have no defined above/below."""
    first, relation, second = statement
    if relation != facts["relation"]:
        raise ValueError(f"cannot judge {relation!r} in a {facts['relation']!r} scene")
    a, b = ((o["colour"], o["shape"]) for o in facts["objects"])
    # colours and shapes differ between the objects, so a description names at most one
    return (first, second) == (a, b)


def statements(facts: dict) -> dict:
    """Kind -> statement for a scene of two objects differing in colour and in shape."""
    (ca, sa), (cb, sb) = ((o["colour"], o["shape"]) for o in facts["objects"])
    if ca == cb or sa == sb:
        raise ValueError(f"swaps need different colours and shapes, got {ca} {sa} / {cb} {sb}")
    rel = facts["relation"]
    return {"true": ((ca, sa), rel, (cb, sb)),
            "colour_swap": ((cb, sa), rel, (ca, sb)),
            "shape_swap": ((ca, sb), rel, (cb, sa)),
            "relation_swap": ((cb, sb), rel, (ca, sa))}


def candidates(facts: dict) -> list[str]:
    """The captions in :data:`KINDS` order, each checked: the first true of the scene, the
    others false, all made of the same words (so no bag of words can tell them apart)."""
    made = statements(facts)
    out = []
    for kind in KINDS:
        if is_true(made[kind], facts) != (kind == "true"):
            raise AssertionError(f"{kind} caption {caption(made[kind])!r} has the wrong truth for {facts}")
        out.append(caption(made[kind]))
    words = sorted(out[0].split())
    if any(sorted(c.split()) != words for c in out[1:]):
        raise AssertionError(f"distractors do not reuse the true caption's words: {out}")
    return out


def draw_compositional(seed: int, index: int, size: int) -> tuple[bytes, list[str], dict]:
    """PNG bytes, the candidate captions (:data:`KINDS` order) and the facts of image ``index``."""
    rng = random.Random(f"{seed}:compositional:{index}")
    im, bg = _background(rng, size)
    (ca, cb), (sa, sb) = rng.sample(list(COLOURS), 2), rng.sample(SHAPES, 2)
    facts = draw_pair(rng, ImageDraw.Draw(im), size, (ca, sa), (cb, sb), horizontal=rng.random() < 0.5)
    facts["background"] = bg
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), candidates(facts), facts


def write_image(args) -> dict:
    """One entry of compositional.json, its PNG written under OUT/images (a pool task)."""
    out, seed, i, size = args
    png, caps, _ = draw_compositional(seed, i, size)
    rel = f"images/comp_{i:05d}.png"
    with open(os.path.join(out, rel), "wb") as f:
        f.write(png)
    return {"image": rel, "image_id": i, "captions": caps, "kinds": list(KINDS)}
