"""synth's compositional test: deterministic by seed, each image's true caption true and its
distractors false of the picture, all made of the same words (so a bag of words is at
chance), written by ``albef-data synth`` without changing a byte of the other outputs."""
import io
import json
import os

import numpy as np
from PIL import Image

from data_tools import compositional as C
from data_tools.cli import main
from data_tools.synth import COLOURS, draw_example


def test_deterministic_by_seed_and_by_its_own_stream():
    a = [C.draw_compositional(7, i, 64) for i in range(5)]
    assert [x[:2] for x in a] == [C.draw_compositional(7, i, 64)[:2] for i in range(5)]
    assert [x[0] for x in a] != [C.draw_compositional(8, i, 64)[0] for i in range(5)]
    # not the test split's images under another name
    assert a[0][0] != draw_example(7, "test", 0, 64)[0]


def test_distractors_are_false_same_words_and_the_truth_is_drawn():
    relations = set()
    for i in range(300):
        png, caps, facts = C.draw_compositional(0, i, 64)
        (ca, sa), (cb, sb) = ((o["colour"], o["shape"]) for o in facts["objects"])
        assert ca != cb and sa != sb
        assert len(caps) == len(C.KINDS) == 4 and len(set(caps)) == 4
        # the same multiset of words: a bag-of-words model scores the four alike
        assert all(sorted(c.split()) == sorted(caps[0].split()) for c in caps)
        made = C.statements(facts)
        assert [C.caption(made[k]) for k in C.KINDS] == caps
        assert [C.is_true(made[k], facts) for k in C.KINDS] == [True, False, False, False]
        rel = facts["relation"]
        relations.add(rel)
        assert caps[0] == C.TEMPLATES[rel].format(*(("an " if c[0] in "aeiou" else "a ") + f"{c} {s}"
                                                   for c, s in ((ca, sa), (cb, sb))))
        # the picture: the first object's colour lies left of (above) the second's
        px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        axis = 1 if rel == "left" else 0

        def mean_pos(name):
            return np.nonzero(np.abs(px - np.array(COLOURS[name])).sum(-1) < 30)[axis].mean()
        assert mean_pos(ca) < mean_pos(cb), (i, caps[0])
    assert relations == {"left", "above"}


def test_the_template_is_the_train_captions_wording():
    """Every train relation scene has its canonical caption among its paraphrases."""
    seen = 0
    for i in range(200):
        _, caps = draw_example(0, "train", i, 64)
        for template in C.TEMPLATES.values():
            word = template.split("{0}")[1].split("{1}")[0]  # " to the left of ", " above "
            seen += any(word in c for c in caps)
    assert seen > 50


def _synth(out, n_comp):
    assert main(["synth", "--out", str(out), "--seed", "5", "--num-train", "50", "--num-val", "4",
                 "--num-test", "6", "--num-compositional", str(n_comp), "--workers", "2", "--no-progress"]) == 0


def _files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs}


def test_synth_writes_it_and_changes_nothing_else(tmp_path):
    _synth(tmp_path / "with", 8)
    _synth(tmp_path / "without", 0)
    got, base = _files(tmp_path / "with"), _files(tmp_path / "without")
    assert C.FILE not in base and not any("comp_" in f for f in base)
    extra = {f for f in got if f not in base}
    assert extra == {C.FILE} | {f"images/comp_{i:05d}.png" for i in range(8)}
    for f, data in base.items():
        if f != "synth.json":  # which records num_compositional
            assert got[f] == data, f
    entries = json.loads(got[C.FILE])
    assert [e["image_id"] for e in entries] == list(range(8))
    for i, e in enumerate(entries):
        png, caps, _ = C.draw_compositional(5, i, 64)
        assert e == {"image": f"images/comp_{i:05d}.png", "image_id": i, "captions": caps, "kinds": list(C.KINDS)}
        assert got[e["image"]] == png
    assert json.loads(got["synth.json"])["num_compositional"] == 8
