"""``albef-data synth-tasks``: synthetic versions of ALBEF's downstream tasks, in the
reference's JSON layouts, from ``albef-data synth`` scenes (whose objects, colours,
positions and boxes the generator knows, data_tools.synth.draw_scene).

Layout of OUT (image paths in every JSON are relative to OUT, the default image root):
  images/{split}_{i:05d}.png          the scenes (split: train, val, test)
  ve_{train,dev,test}.json            SNLI-VE: [{"image", "sentence", "label"}], label
                                      entailment / neutral / contradiction (one of each per image)
  vqa_{train,val,test}.json           VQA: [{"question_id", "question", "answer": [10 answers],
                                      "image", "dataset": "vqa"}] (test keeps its answers, so
                                      it can be scored here; the official test split has none)
  answer_list.json                    the candidate answers VQA ranks at test time
  nlvr_{train,dev,test}.json          NLVR2: [{"images": [a, b], "sentence", "label": "True"/"False"}]
  grounding_{train,val,test}.json     referring expressions: train [{"image", "text", "ref_id"}]
                                      (weak supervision: no boxes); val/test add "box" [x, y, w, h]
                                      and "proposals" (candidate boxes, the true one among them)
  synth_tasks.json                    the options used, and per file the label counts (chance)

What each task needs the image for: VE's entailment and contradiction hypotheses use the
same words (a colour, a shape, a count or a relation changed), so only the image tells them
apart; its neutral hypotheses add a property no picture shows ("made of paper"), which a
text-only model can spot (as in SNLI-VE, where hypothesis-only baselines beat chance).
Every example of image ``i`` is drawn from ``random.Random(f"{seed}:tasks:{split}:{i}")``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

from data_tools.synth import COLOURS, NUMBERS, PLURAL, SHAPES, _article, draw_scene

#: properties no picture shows: a hypothesis that adds one is neither entailed nor contradicted
UNSEEN = ("made of paper", "drawn by a child", "painted last week", "for sale", "seen from far away",
          "that someone likes")
VE_LABELS = ("entailment", "neutral", "contradiction")
YES_NO = ("yes", "no")


@dataclass
class SynthTaskOptions:
    out: str
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    image_size: int = 64
    progress: bool = True


# ----------------------------------------------------------------------------- phrases

def _desc(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _other(rng: random.Random, options, current):
    return rng.choice([o for o in options if o != current])


def _true_statement(facts: dict) -> str:
    objs = facts["objects"]
    if facts["scene"] == "single":
        return f"there is {_article(_desc(objs[0]))}"
    if facts["scene"] == "count":
        return f"there are {NUMBERS[len(objs)]} {objs[0]['colour']} {PLURAL[objs[0]['shape']]}"
    word = "to the left of" if facts["relation"] == "left" else "above"
    return f"{_article(_desc(objs[0]))} is {word} {_article(_desc(objs[1]))}"


def _false_statement(rng: random.Random, facts: dict) -> str:
    """The true statement with one thing changed: colour, shape, count, or the relation's
    order (the same words, bound the other way)."""
    objs = [dict(o) for o in facts["objects"]]
    scene = facts["scene"]
    if scene == "count":
        n = len(objs)
        if rng.random() < 0.5:
            n = _other(rng, list(NUMBERS), n)
            return f"there are {NUMBERS[n]} {objs[0]['colour']} {PLURAL[objs[0]['shape']]}"
        return f"there are {NUMBERS[n]} {_other(rng, list(COLOURS), objs[0]['colour'])} {PLURAL[objs[0]['shape']]}"
    if scene == "relation" and rng.random() < 0.5 and _desc(objs[0]) != _desc(objs[1]):
        objs.reverse()
    else:
        o = rng.choice(objs)
        if rng.random() < 0.5:
            o["colour"] = _other(rng, list(COLOURS), o["colour"])
        else:
            o["shape"] = _other(rng, SHAPES, o["shape"])
    changed = dict(facts, objects=objs)
    sentence = _true_statement(changed)
    return sentence if sentence != _true_statement(facts) else _false_statement(rng, facts)


def _has(facts: dict, colour: str | None, shape: str | None) -> bool:
    return any((colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)
               for o in facts["objects"])


# ----------------------------------------------------------------------------- tasks

def ve_examples(rng: random.Random, image: str, facts: dict) -> list[dict]:
    true = _true_statement(facts)
    return [{"image": image, "sentence": true, "label": "entailment"},
            {"image": image, "sentence": f"{true}, {rng.choice(UNSEEN)}", "label": "neutral"},
            {"image": image, "sentence": _false_statement(rng, facts), "label": "contradiction"}]


def vqa_examples(rng: random.Random, image: str, facts: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs about this scene."""
    objs, scene = facts["objects"], facts["scene"]
    out = []
    if scene == "single":
        o = objs[0]
        out.append((f"what color is the {o['shape']}?", o["colour"]))
        out.append(("what shape is in the picture?", o["shape"]))
    elif scene == "count":
        o = objs[0]
        out.append((f"how many {PLURAL[o['shape']]} are there?", NUMBERS[len(objs)]))
        out.append(("what color are the shapes?", o["colour"]))
    else:
        first, second = ("left", "right") if facts["relation"] == "left" else ("top", "bottom")
        i = rng.randrange(2)
        where = (first, second)[i]
        out.append((f"what color is the shape on the {where}?", objs[i]["colour"]))
        out.append((f"what shape is on the {where}?", objs[i]["shape"]))
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if rng.random() < 0.5:  # a yes question about a shape that is there, half the time
        colour, shape = objs[0]["colour"], objs[0]["shape"]
    out.append((f"is there a {colour} {shape}?", "yes" if _has(facts, colour, shape) else "no"))
    return out


def answer_list() -> list[str]:
    return list(COLOURS) + list(SHAPES) + [NUMBERS[n] for n in sorted(NUMBERS)] + list(YES_NO)


def nlvr_example(rng: random.Random, images: tuple[str, str], facts: tuple[dict, dict], want: bool) -> dict:
    """A sentence about the pair whose truth is ``want`` (tried a few templates; the
    label is what the facts say, so it is right even when ``want`` is not reachable)."""
    for _ in range(50):
        kind = rng.randrange(4)
        if kind < 2:  # one image holds a thing
            side = ("left", "right")[kind]
            pick = rng.choice(facts[kind]["objects"]) if rng.random() < 0.5 else \
                {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
            sentence = f"the {side} image contains {_article(_desc(pick))}"
            truth = _has(facts[kind], pick["colour"], pick["shape"])
        elif kind == 2:  # both images hold a shape
            shape = rng.choice([o["shape"] for o in facts[0]["objects"]] + list(SHAPES))
            sentence = f"both images contain a {shape}"
            truth = _has(facts[0], None, shape) and _has(facts[1], None, shape)
        else:  # counting across the pair
            n0, n1 = len(facts[0]["objects"]), len(facts[1]["objects"])
            if n0 == n1:
                continue
            side = rng.choice(("left", "right"))
            sentence = f"there are more shapes in the {side} image than in the other one"
            truth = (n0 > n1) == (side == "left")
        if truth == want:
            break
    return {"images": list(images), "sentence": sentence, "label": str(truth)}


def grounding_examples(rng: random.Random, image: str, facts: dict, size: int, ref_base: int,
                       with_boxes: bool) -> list[dict]:
    """Referring expressions for scenes of two or more distinguishable objects."""
    objs = facts["objects"]
    if facts["scene"] != "relation" or _desc(objs[0]) == _desc(objs[1]):
        return []
    first, second = ("left", "right") if facts["relation"] == "left" else ("top", "bottom")
    out = []
    for i, o in enumerate(objs):
        other = objs[1 - i]
        if o["shape"] != other["shape"]:
            text = f"the {o['shape']}" if rng.random() < 0.5 else f"the {_desc(o)}"
        elif o["colour"] != other["colour"]:
            text = f"the {o['colour']} one"
        else:
            text = f"the shape on the {(first, second)[i]}"
        entry = {"image": image, "text": text, "ref_id": ref_base + i}
        if with_boxes:
            proposals = [obj["box"] for obj in objs] + [_random_box(rng, size) for _ in range(2)]
            rng.shuffle(proposals)
            entry.update(box=o["box"], proposals=proposals)
        out.append(entry)
    return out


def _random_box(rng: random.Random, size: int) -> list[float]:
    w = rng.uniform(0.2, 0.4) * size
    return [round(rng.uniform(0, size - w), 2), round(rng.uniform(0, size - w), 2), round(w, 2), round(w, 2)]


# ----------------------------------------------------------------------------- writer

def synth_tasks(opts: SynthTaskOptions) -> dict:
    from tqdm import tqdm

    start = time.time()
    if os.path.exists(opts.out):
        shutil.rmtree(opts.out)  # a fresh, deterministic folder every time
    os.makedirs(os.path.join(opts.out, "images"))
    files: dict[str, list] = {}
    split_names = {"train": ("train", "train", "train", "train"), "val": ("dev", "val", "dev", "val"),
                   "test": ("test", "test", "test", "test")}
    question_id = 0
    for split, n in (("train", opts.num_train), ("val", opts.num_val), ("test", opts.num_test)):
        ve_name, vqa_name, nlvr_name, ground_name = split_names[split]
        ve, vqa, nlvr, grounding = [], [], [], []
        scenes = []
        for i in tqdm(range(n), desc=f"synth-tasks {split}", unit="image", disable=not opts.progress):
            png, _, facts = draw_scene(opts.seed, f"task-{split}", i, opts.image_size)
            rel = f"images/{split}_{i:05d}.png"
            with open(os.path.join(opts.out, rel), "wb") as f:
                f.write(png)
            rng = random.Random(f"{opts.seed}:tasks:{split}:{i}")
            scenes.append((rel, facts))
            ve += ve_examples(rng, rel, facts)
            for question, answer in vqa_examples(rng, rel, facts):
                vqa.append({"question_id": question_id, "question": question, "answer": [answer] * 10,
                            "image": rel, "dataset": "vqa"})
                question_id += 1
            grounding += grounding_examples(rng, rel, facts, opts.image_size, 2 * i, with_boxes=split != "train")
        for i in range(n):  # each image is the left one once, beside a random partner
            rng = random.Random(f"{opts.seed}:tasks:nlvr:{split}:{i}")
            j = rng.randrange(n - 1) if n > 1 else 0
            j += j >= i and n > 1
            nlvr.append(nlvr_example(rng, (scenes[i][0], scenes[j][0]), (scenes[i][1], scenes[j][1]),
                                     want=i % 2 == 0))
        files[f"ve_{ve_name}.json"] = ve
        files[f"vqa_{vqa_name}.json"] = vqa
        files[f"nlvr_{nlvr_name}.json"] = nlvr
        files[f"grounding_{ground_name}.json"] = grounding
    files["answer_list.json"] = answer_list()
    counts = {}
    for name, entries in files.items():
        with open(os.path.join(opts.out, name), "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=0)
        if name.startswith(("ve_", "nlvr_")):
            counts[name] = dict(Counter(e["label"] for e in entries))
        elif name.startswith("vqa_"):
            counts[name] = dict(Counter(e["answer"][0] for e in entries))
        elif name.startswith("grounding_"):
            counts[name] = {"expressions": len(entries),
                            "proposals_per_expression": len(entries[0]["proposals"]) if entries and "proposals" in entries[0] else 0}
    with open(os.path.join(opts.out, "synth_tasks.json"), "w", encoding="utf-8") as f:
        json.dump({"options": {k: v for k, v in asdict(opts).items() if k not in ("out", "progress")},
                   "counts": counts}, f, indent=1)
    seconds = round(time.time() - start, 2)
    print(f"synth-tasks: {opts.num_train}/{opts.num_val}/{opts.num_test} train/val/test images; "
          f"VE {len(files['ve_train.json'])}, VQA {len(files['vqa_train.json'])}, NLVR2 {len(files['nlvr_train.json'])}, "
          f"grounding {len(files['grounding_train.json'])} training examples in {opts.out} ({seconds}s)", file=sys.stderr)
    return {"counts": counts, "seconds": seconds}
