"""The probes behind docs/benchmarks.md, "Binding: what the tiny model binds": does a model know
WHERE each colour is, and which shape is which, or only which words are present?

    python docs/binding_probes.py fill RUN_DIR [--tag step_N]     # a pretrained run
    python docs/binding_probes.py vit --patch 16 --steps 2000 --pos sincos   # the ViT alone

``fill``: on the compositional test beside the run's training data (compositional.json of
``albef-data synth``), each true caption ("a red circle to the left of a blue square") with
BOTH colour words masked, then both shape words masked; the MLM head, restricted to that
group's words, fills each slot. A model that knows only which colours are present puts them
in either slot: "right" and "the other object's word" near 50 % each. With one word masked
the other gives the answer away by elimination, so both are masked.

``vit``: the tiny ViT (albef_ds.models.vit, the tiny preset's width/depth/heads) trained
supervised, from random init, to name the colour and the shape of the first and the second
object of a relation scene (data_tools.synth.draw_pair, 20,000 images; 4 linear heads on
[CLS]; AdamW, batch 32): how many steps the encoder needs before positions and shapes are
readable at all, with the default or the sine-cosine position init.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GROUPS = {"colour": ["red", "green", "blue", "yellow", "purple", "orange", "white"],
          "shape": ["circle", "square", "triangle", "diamond"]}


def fill(run: Path, tag: str | None) -> None:
    from albef_ds.config import load_config
    from albef_ds.eval.io import make_io, read_compositional
    from albef_ds.tokenizer import load_tokenizer
    from albef_ds.train.export import consolidate

    cfg = load_config(run / "config.yaml")
    tok = load_tokenizer(cfg.data.tokenizer)
    tag = tag or (run / "checkpoints" / "latest").read_text().strip()
    model = consolidate(run / "checkpoints" / tag, cfg).eval()
    data = Path(cfg.data.train_dirs[0]).parent
    comp = read_compositional(data / "compositional.json", cfg.data.max_words)
    load_images, tokenize = make_io(cfg, comp, data, tok)
    vocab = {g: torch.tensor([tok.convert_tokens_to_ids(w) for w in words]) for g, words in GROUPS.items()}
    right = {g: 0 for g in GROUPS}
    swapped = {g: 0 for g in GROUPS}
    n = len(comp)
    with torch.no_grad():
        for start in range(0, n, 100):
            idx = list(range(start, min(n, start + 100)))
            rows = torch.arange(len(idx))
            ids, mask = tokenize([comp.captions[i][0] for i in idx])  # the true caption
            image_embeds = model.encode_image(load_images(idx))
            for g, words in vocab.items():
                slots = torch.stack([row.nonzero().flatten()[:2] for row in torch.isin(ids, words)])
                masked = ids.clone()
                masked[rows[:, None], slots] = tok.mask_token_id
                logits = model.mlm_logits(masked, mask, image_embeds=image_embeds)
                for s in range(2):
                    pick = words[logits[rows, slots[:, s]][:, words].argmax(1)]
                    right[g] += int((pick == ids[rows, slots[:, s]]).sum())
                    swapped[g] += int((pick == ids[rows, slots[:, 1 - s]]).sum())
    for g in GROUPS:
        print(f"{run.name} {tag}: {g} words, both masked: right {100 * right[g] / (2 * n):.1f} %, "
              f"the other object's word {100 * swapped[g] / (2 * n):.1f} % ({n} images)")


def vit(patch: int, steps: int, lr: float, pos: str, threads: int) -> None:
    import numpy as np
    from PIL import ImageDraw

    from albef_ds.config import load_config
    from albef_ds.models import vit as vit_lib
    from data_tools.synth import COLOURS, SHAPES, _background, draw_pair

    torch.set_num_threads(threads)
    colours, shapes = list(COLOURS), list(SHAPES)

    def scene(i: int):
        rng = random.Random(f"binding-probe:{i}")
        im, _ = _background(rng, 64)
        a = (rng.choice(colours), rng.choice(shapes))
        b = a
        while b == a:
            b = (rng.choice(colours), rng.choice(shapes))
        draw_pair(rng, ImageDraw.Draw(im), 64, a, b, horizontal=rng.random() < 0.5)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
        return (x - 0.45) / 0.27, torch.tensor([colours.index(a[0]), shapes.index(a[1]),
                                                 colours.index(b[0]), shapes.index(b[1])])

    def stack(rng_range):
        xs, ys = zip(*(scene(i) for i in rng_range))
        return torch.stack(xs), torch.stack(ys)
    x_train, y_train = stack(range(20_000))
    x_test, y_test = stack(range(20_000, 21_000))
    m = load_config("tiny").model
    torch.manual_seed(0)
    encoder = vit_lib.build_vit(64, patch, m.vision_width, m.vision_depth, m.vision_heads, pos_init=pos)
    sizes = [len(colours), len(shapes), len(colours), len(shapes)]
    head = torch.nn.Linear(m.vision_width, sum(sizes))
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.02)

    def logits(x):
        return head(vit_lib.encode(encoder, x)[:, 0]).split(sizes, dim=1)
    start = time.time()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(x_train), (32,))
        loss = sum(F.cross_entropy(out, y_train[batch, j]) for j, out in enumerate(logits(x_train[batch])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0:
            with torch.no_grad():
                acc = [float((out.argmax(1) == y_test[:, j]).float().mean()) for j, out in enumerate(logits(x_test))]
            print(f"patch {patch} pos {pos} lr {lr:g} step {step}: colour 1st {acc[0]:.2f} shape 1st {acc[1]:.2f} "
                  f"colour 2nd {acc[2]:.2f} shape 2nd {acc[3]:.2f} (chance 0.14 / 0.25; {time.time() - start:.0f} s)",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    f = sub.add_parser("fill", help="MLM fill-in of masked colour/shape words on the compositional test")
    f.add_argument("run", type=Path)
    f.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    v = sub.add_parser("vit", help="the tiny ViT trained supervised to name both objects")
    v.add_argument("--patch", type=int, default=16)
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--lr", type=float, default=5e-4)
    v.add_argument("--pos", choices=("normal", "sincos"), default="normal")
    v.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.probe == "fill":
        fill(args.run, args.tag)
    else:
        vit(args.patch, args.steps, args.lr, args.pos, args.threads)


if __name__ == "__main__":
    main()
