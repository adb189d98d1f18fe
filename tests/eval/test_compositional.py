"""The compositional evaluator against a plain per-caption computation on a tiny ALBEF, and
at its two ends: scores that cannot tell the candidates apart land at chance, a model told
the answer at 100 %. The reader's errors name the file and the entry."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from albef_ds.config import ConfigError
from albef_ds.eval.compositional import evaluate_compositional, pick_accuracy, set_from_entries
from albef_ds.eval.io import read_compositional

KINDS = ["true", "colour_swap", "shape_swap", "relation_swap"]
WORDS = "a an red blue green orange circle square triangle to the left of above".split()


def entries(n=5):
    """Captions of the benchmark's form: four per image, the same words, the true one first."""
    cols, shapes = ["red", "blue", "green", "orange"], ["circle", "square", "triangle"]
    out = []
    for i in range(n):
        ca, cb = cols[i % 4], cols[(i + 1) % 4]
        sa, sb = shapes[i % 3], shapes[(i + 1) % 3]
        rel = "to the left of" if i % 2 else "above"
        art = lambda c: "an" if c[0] in "aeiou" else "a"  # noqa: E731
        cap = lambda c1, s1, c2, s2: f"{art(c1)} {c1} {s1} {rel} {art(c2)} {c2} {s2}"  # noqa: E731
        out.append({"image": f"comp_{i}.png", "image_id": i, "kinds": KINDS,
                    "captions": [cap(ca, sa, cb, sb), cap(cb, sa, ca, sb), cap(ca, sb, cb, sa), cap(cb, sb, ca, sa)]})
    return out


def word_tokenize(length=12):
    def tokenize(texts):
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, t in enumerate(texts):
            w = [2] + [5 + WORDS.index(x) for x in t.split()]
            ids[r, :len(w)], mask[r, :len(w)] = torch.tensor(w), 1
        return ids, mask
    return tokenize


def load_images(res):
    return lambda idx: torch.stack([torch.randn(3, res, res, generator=torch.Generator().manual_seed(i))
                                    for i in idx])


def tiny_model():
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    cfg = load_config("tiny", ["model.image_res=32", "model.vocab_size=40", "model.queue_size=64"])
    torch.manual_seed(0)
    return ALBEF(cfg.model).eval()


def test_scores_match_a_plain_per_caption_computation_on_a_tiny_albef():
    model = tiny_model()
    data = set_from_entries(entries(5))
    tok, imgs = word_tokenize(), load_images(32)
    m = evaluate_compositional(model, data, imgs, tok, batch_size=2)  # chunks of 2 images: 2+2+1

    itc_hits = itm_hits = 0
    itc_pair = [0] * 3
    with torch.no_grad():
        for i in range(len(data)):
            img = model.encode_image(imgs([i]))
            f_img = model.image_feat(img)[0]
            itc, itm = [], []
            for cap in data.captions[i]:  # one caption at a time, nothing batched
                ids, mask = tok([cap])
                txt = model.encode_text(ids, mask)
                itc.append(F.cosine_similarity(f_img, model.text_feat(txt, mask)[0], dim=0).item())
                itm.append(model.itm_logits(model.fuse(txt, mask, img)).softmax(-1)[0, 1].item())
            itc_hits += max(range(4), key=lambda c: itc[c]) == 0
            itm_hits += max(range(4), key=lambda c: itm[c]) == 0
            for k in range(3):
                itc_pair[k] += itc[0] > itc[k + 1]
    assert m["n"] == 5 and m["num_candidates"] == 4
    assert m["chance"] == pytest.approx(25.0) and m["pair_chance"] == 50.0
    assert m["itc_acc"] == pytest.approx(100 * itc_hits / 5)
    assert m["itm_acc"] == pytest.approx(100 * itm_hits / 5)
    for k, kind in enumerate(KINDS[1:]):
        assert m[f"itc_vs_{kind}"] == pytest.approx(100 * itc_pair[k] / 5)


class Stub(nn.Module):
    """ALBEF's scoring interface with scores chosen by ``text_score(ids) -> [B]``."""

    def __init__(self, text_score):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.text_score = text_score

    def encode_image(self, images):
        return torch.ones(images.shape[0], 2, 4)

    def image_feat(self, image_embeds):
        return F.normalize(torch.ones(image_embeds.shape[0], 2), dim=-1)

    def encode_text(self, ids, mask):
        return self.text_score(ids)[:, None, None].expand(-1, ids.shape[1], 4).clone()

    def text_feat(self, text_embeds, mask):
        # the cosine with the image feature (1, 1) grows with the score
        s = text_embeds[:, 0, 0]
        return F.normalize(torch.stack([torch.ones_like(s), -torch.exp(-s)], -1), dim=-1)

    def fuse(self, text_embeds, mask, image_embeds):
        return text_embeds

    def itm_logits(self, fused, mask=None):
        return torch.stack([torch.zeros_like(fused[:, 0, 0]), fused[:, 0, 0]], -1)


def test_scores_that_cannot_tell_candidates_apart_are_at_chance():
    data = set_from_entries(entries(6))
    constant = Stub(lambda ids: torch.zeros(ids.shape[0]))
    # a bag of words: the sum of word ids ignores their order, and the candidates are the same words
    bag = Stub(lambda ids: ids.float().sum(1) / 100)
    for model in (constant, bag):
        m = evaluate_compositional(model, data, load_images(8), word_tokenize(), batch_size=4)
        assert m["itc_acc"] == pytest.approx(25.0) and m["itm_acc"] == pytest.approx(25.0)
        assert m["itc_vs_colour_swap"] == pytest.approx(50.0)


def test_a_model_told_the_answer_scores_100():
    raw = entries(6)
    tok = word_tokenize()
    truths = {tuple(tok([e["captions"][0]])[0][0].tolist()) for e in raw}
    told = Stub(lambda ids: torch.tensor([float(tuple(r.tolist()) in truths) for r in ids]))
    m = evaluate_compositional(told, set_from_entries(raw), load_images(8), tok, batch_size=4)
    assert m["itc_acc"] == 100.0 and m["itm_acc"] == 100.0
    assert all(m[f"{s}_vs_{k}"] == 100.0 for s in ("itc", "itm") for k in KINDS[1:])
    # and the reverse: told the answer, picking anything else scores 0
    liar = Stub(lambda ids: torch.tensor([-float(tuple(r.tolist()) in truths) for r in ids]))
    assert evaluate_compositional(liar, set_from_entries(raw), load_images(8), tok)["itc_acc"] == 0.0


def test_ties_are_shared():
    s = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([2.0, 1.0, 1.0, 1.0])]
    # truth tied with one other: 1/2; truth below the top: 0; truth alone on top: 1
    assert pick_accuracy(s, [0, 0, 0]) == pytest.approx(100 * 1.5 / 3)


def test_the_reader_checks_entries_and_names_file_and_entry(tmp_path):
    good = entries(3)
    p = tmp_path / "compositional.json"
    p.write_text(json.dumps(good))
    data = read_compositional(p, max_words=30, max_images=2)
    assert len(data) == 2 and data.kinds[0] == KINDS and data.image_ids == [0, 1]
    for i, change, says in [(1, lambda e: e.pop("image"), "lacks 'image'"),
                            (2, lambda e: e.update(kinds=["colour_swap"] * 4), "exactly one kind 'true'"),
                            (0, lambda e: e.update(kinds=KINDS[:3]), "4 captions but 'kinds'"),
                            (1, lambda e: e.update(captions="a red circle"), "at least two strings")]:
        bad = [dict(e) for e in good]
        change(bad[i])
        p.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=f"{p}: entry {i} .*{says}"):
            read_compositional(p, max_words=30)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_compositional(p, max_words=30)
    with pytest.raises(FileNotFoundError, match="compositional test not found"):
        read_compositional(tmp_path / "nope.json", max_words=30)
