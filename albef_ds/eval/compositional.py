"""The compositional test: pick each image's true caption among distractors of the same words.

``albef-data synth`` writes it (compositional.json, data_tools/compositional.py): per image
the true caption and captions that bind the same words differently (colours swapped, shapes
swapped, objects swapped). Every candidate of an image is scored two ways, as retrieval
scores pairs (albef_ds/eval/retrieval.py): by ITC, the cosine of the image's and the
caption's features, and by ITM, the fusion encoder's log-probability of "match". The
highest-scoring candidate is the pick.

Ties are shared: a truth tied at the top with m - 1 distractors earns 1/m, the expected
score of breaking the tie at random. So a model whose scores cannot tell the candidates
apart (constant, or any bag of words, since the candidates are the same words) lands
exactly at chance, neither at 0 nor at 100 %.

Besides the accuracy over all candidates, ``*_vs_<kind>`` is the pairwise accuracy of the
truth against that kind of distractor alone (chance 50 %): which binding a model misses.
All accuracies are percentages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..config import ConfigError
from ..losses import at_least_fp32
from .retrieval import chunks

#: the kind naming each image's true caption
TRUE = "true"
#: the name ``albef-data synth`` gives the file, beside test.json (the library does not
#: import data_tools, so the name is repeated here)
FILE = "compositional.json"


@dataclass
class CompositionalSet:
    images: list            # image paths (as make_io's ``split.images``)
    captions: list          # per image: its candidate captions (cleaned)
    kinds: list             # per image: the kind of each candidate, exactly one TRUE
    image_ids: list

    def __len__(self) -> int:
        return len(self.images)


def set_from_entries(entries: Sequence[dict], clean: Callable[[str], str] = lambda s: s,
                     where: str = "compositional set") -> CompositionalSet:
    """Entries ``{"image", "captions": [...], "kinds": [...], "image_id"?}``, checked: each
    error (a ConfigError: the CLI prints it on one line) names ``where`` and the entry."""
    out = CompositionalSet([], [], [], [])
    for i, e in enumerate(entries):
        def bad(why: str) -> ConfigError:
            return ConfigError(f"{where}: entry {i} {why} (expected {{\"image\": path, \"captions\": "
                              f"[true, distractor, ...], \"kinds\": [\"true\", ...]}})")
        if not isinstance(e, dict):
            raise bad(f"is a {type(e).__name__}, not an object")
        missing = [k for k in ("image", "captions", "kinds") if k not in e]
        if missing:
            raise bad(f"lacks {', '.join(map(repr, missing))}")
        caps, kinds = e["captions"], e["kinds"]
        if not isinstance(caps, list) or len(caps) < 2 or not all(isinstance(c, str) for c in caps):
            raise bad("needs 'captions' as a list of at least two strings")
        if not isinstance(kinds, list) or len(kinds) != len(caps):
            raise bad(f"has {len(caps)} captions but 'kinds' is not a list of as many")
        if kinds.count(TRUE) != 1:
            raise bad(f"needs exactly one kind {TRUE!r}, has {kinds.count(TRUE)}")
        out.images.append(e["image"])
        out.captions.append([clean(c) for c in caps])
        out.kinds.append(list(kinds))
        out.image_ids.append(e.get("image_id", i))
    if not out.images:
        raise ConfigError(f"{where}: no entries")
    return out


def pick_accuracy(scores: Sequence[torch.Tensor], truth: Sequence[int]) -> float:
    """Mean over images of the credit for picking ``truth`` by the highest score, ties
    shared (1/m for a truth tied with m - 1 others at the top)."""
    credit = 0.0
    for row, t in zip(scores, truth):
        top = row == row.max()
        credit += float(top[t]) / int(top.sum())
    return 100.0 * credit / len(truth)


@torch.no_grad()
def score_candidates(model, data: CompositionalSet, load_images: Callable[[Sequence[int]], torch.Tensor],
                     tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device = torch.device("cpu"), batch_size: int = 64, stop=None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, the ITC and the ITM score of each of its candidates (CPU; float32, float64
    for a float64 model). ``stop``: a StopFlag, read between batches."""
    model.eval()
    dtype = next(model.parameters()).dtype
    itc, itm = [], []
    for c in chunks(len(data), batch_size):
        if stop is not None:
            stop.raise_if_requested(f"the compositional test ({c.start} of {len(data)} images done)")
        image_embeds = model.encode_image(load_images(c).to(device, dtype))
        image_feat = model.image_feat(image_embeds)
        texts = [t for i in c for t in data.captions[i]]
        owner = torch.tensor([j for j, i in enumerate(c) for _ in data.captions[i]], device=device)
        ids, mask = (x.to(device) for x in tokenize(texts))
        text_embeds = model.encode_text(ids, mask)
        text_feat = model.text_feat(text_embeds, mask)
        # features are L2-normalised: the dot product is the cosine retrieval ranks by
        sim = (at_least_fp32(image_feat[owner]) * at_least_fp32(text_feat)).sum(-1)
        fused = model.fuse(text_embeds, mask, image_embeds[owner])
        # log p(match), not p: the same order, without float32 rounding confident
        # probabilities to a tied 1.0
        match = torch.log_softmax(at_least_fp32(model.itm_logits(fused, mask)), dim=-1)[:, 1]
        sizes = [len(data.captions[i]) for i in c]
        itc.extend(sim.cpu().split(sizes))
        itm.extend(match.cpu().split(sizes))
    return itc, itm


def evaluate_compositional(model, data: CompositionalSet, load_images: Callable[[Sequence[int]], torch.Tensor],
                           tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device = torch.device("cpu"), batch_size: int = 64, stop=None) -> dict:
    """``{"itc_acc", "itm_acc", "chance", "n", "num_candidates", "itc_vs_<kind>",
    "itm_vs_<kind>", "pair_chance"}`` of ``model`` (an ALBEF) on ``data``; accuracies in %.
    ``load_images(indices)`` and ``tokenize(texts)`` as for retrieval (eval/io.py make_io)."""
    itc, itm = score_candidates(model, data, load_images, tokenize, device, batch_size, stop)
    truth = [k.index(TRUE) for k in data.kinds]
    n_cand = [len(k) for k in data.kinds]
    out = {"n": len(data), "num_candidates": max(n_cand),
           "chance": 100.0 * sum(1.0 / m for m in n_cand) / len(data),
           "itc_acc": pick_accuracy(itc, truth), "itm_acc": pick_accuracy(itm, truth), "pair_chance": 50.0}
    kinds = list(dict.fromkeys(k for ks in data.kinds for k in ks if k != TRUE))  # file order
    for kind in kinds:
        # the images that have this kind of distractor, each truth against that one alone
        rows = [(i, ks.index(kind)) for i, ks in enumerate(data.kinds) if kind in ks]
        for name, scores in (("itc", itc), ("itm", itm)):
            pairs = [scores[i][[truth[i], j]] for i, j in rows]
            out[f"{name}_vs_{kind}"] = pick_accuracy(pairs, [0] * len(rows))
    return out


def format_compositional(m: dict) -> str:
    """A small table: accuracy over all candidates, then against each kind, beside chance."""
    kinds = [k[len("itc_vs_"):] for k in m if k.startswith("itc_vs_")]
    lines = [f"compositional test: {m['n']} images, true caption among {m['num_candidates']} candidates",
             f"{'':24s}{'ITC':>9s}{'ITM':>9s}{'chance':>9s}",
             f"{'all candidates':24s}{m['itc_acc']:9.2f}{m['itm_acc']:9.2f}{m['chance']:9.2f}"]
    lines += [f"{'vs ' + k:24s}{m['itc_vs_' + k]:9.2f}{m['itm_vs_' + k]:9.2f}{m['pair_chance']:9.2f}"
              for k in kinds]
    return "\n".join(lines)
