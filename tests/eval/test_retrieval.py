"""Recall, chance and re-ranking against counts written plainly here."""
import numpy as np
import pytest
import torch

from tests.support.retrieval import fake_io, fake_split
from albef_ds.eval.retrieval import (OUTSIDE_TOP_K, RANKINGS, RECALL_KEYS, chance_metrics, evaluate, format_table,
                                     ranking_rows, ranks_of_truth, recall_metrics, rerank, scatter_top_k,
                                     split_from_entries)


def brute_recall(scores, truths, k):
    """Fraction of queries whose best truth has fewer than k wrong candidates scoring >= it."""
    hits = 0
    for q in range(len(scores)):
        best = max(scores[q][t] for t in truths[q])
        ahead = sum(1 for c in range(len(scores[q])) if c not in truths[q] and scores[q][c] >= best)
        hits += ahead < k
    return 100.0 * hits / len(scores)


def test_recall_matches_brute_force_with_ties_and_several_captions():
    rng = np.random.default_rng(0)
    n_img, caps = 7, 3
    img2txt = [[i * caps + j for j in range(caps)] for i in range(n_img)]
    txt2img = [i // caps for i in range(n_img * caps)]
    # Coarse integer scores so ties are frequent.
    s = rng.integers(0, 4, size=(n_img, n_img * caps)).astype(float)
    m = recall_metrics(s, s.T.copy(), img2txt, txt2img)
    for k in (1, 5, 10):
        assert m[f"txt_r{k}"] == pytest.approx(brute_recall(s, img2txt, k))
        assert m[f"img_r{k}"] == pytest.approx(brute_recall(s.T, [[i] for i in txt2img], k))
    assert m["r_mean"] == pytest.approx((m["txt_r1"] + m["txt_r5"] + m["txt_r10"]
                                         + m["img_r1"] + m["img_r5"] + m["img_r10"]) / 6)


def test_hand_made_matrix():
    # 2 images, 4 captions: image 0 owns captions 0 and 1, image 1 owns 2 and 3.
    s = np.array([[0.9, 0.1, 0.9, 0.0],    # caption 2 (wrong) ties the best truth: rank 1
                  [0.0, 0.0, 0.2, 0.8]])   # its second caption is best: rank 0
    assert list(ranks_of_truth(s, [[0, 1], [2, 3]])) == [1, 0]
    m = recall_metrics(s, s.T.copy(), [[0, 1], [2, 3]], [0, 0, 1, 1])
    assert m["txt_r1"] == 50.0
    # text -> image: caption 0 ties 0.9 vs 0.0 (fine), caption 1 ties 0.1 vs 0.0, caption 2
    # prefers image 0 (0.9 > 0.2): wrong, caption 3 right.
    assert m["img_r1"] == 75.0


def test_constant_scores_are_not_perfect():
    s = np.zeros((3, 6))
    m = recall_metrics(s, s.T.copy(), [[0, 1], [2, 3], [4, 5]], [0, 0, 1, 1, 2, 2])
    assert m["txt_r1"] == 0.0 and m["img_r1"] == 0.0


def test_chance():
    c = chance_metrics([[0, 1, 2, 3, 4]] * 10, 50, 10)
    assert c["chance_txt_r1"] == pytest.approx(10.0)
    assert c["chance_img_r1"] == pytest.approx(10.0)
    # R@k: IR k / #images; TR the chance that one of 5 captions out of 50 is in a random top k
    assert c["chance_img_r5"] == pytest.approx(50.0) and c["chance_img_r10"] == pytest.approx(100.0)
    from math import comb
    assert c["chance_txt_r5"] == pytest.approx(100 * (1 - comb(45, 5) / comb(50, 5)))
    assert c["chance_txt_r10"] == pytest.approx(100 * (1 - comb(45, 10) / comb(50, 10)))


def test_rerank_reverses_itc_order():
    itc = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # ITM scores the reverse of ITC: within the top 3, candidate 2 now wins.
    itm = lambda q, top: -itc[q, top]  # noqa: E731
    out = scatter_top_k(*rerank(itc, 3, itm, [0]), 4)
    assert out[0].argmax().item() == 2
    assert out[0, 3].item() == OUTSIDE_TOP_K
    # With candidate 2 the truth, R@1 goes from 0 to 100.
    assert recall_metrics(itc.numpy(), itc.numpy().T.copy(), [[2]], [0, 0, 0, 0])["txt_r1"] == 0.0
    assert ranks_of_truth(out.numpy(), [[2]])[0] == 0


def test_rerank_with_k_at_least_n_rescores_everything():
    torch.manual_seed(0)
    itc = torch.randn(4, 5)
    full = torch.randn(4, 5)
    itm = lambda q, top: full[q, top]  # noqa: E731
    for k in (5, 50):
        assert torch.equal(scatter_top_k(*rerank(itc, k, itm, [0, 1, 2, 3]), 5), full)


def test_split_from_albef_entries_merges_images():
    split = split_from_entries([{"image": "a.jpg", "caption": ["x", "y"]}, {"image": "b.jpg", "caption": "z"},
                                {"image": "a.jpg", "caption": "w"}])
    assert split.images == ["a.jpg", "b.jpg"]
    assert split.img2txt == [[0, 1, 3], [2]]
    assert split.txt2img == [0, 0, 1, 0]


def test_evaluate_runs_on_a_model_and_reports_chance():
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    cfg = load_config("tiny", ["model.image_res=32", "model.vocab_size=50", "model.queue_size=64",
                               "train.micro_batch_size=8"])
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    m = evaluate(model, fake_split(), *fake_io(32, 50), k_test=3, batch_size=4)
    assert m["chance_img_r1"] == pytest.approx(100 / 6)
    assert m["chance_txt_r1"] == pytest.approx(100 * 2 / 12)
    for key in ("itm_txt_r1", "itm_img_r1", "itc_txt_r1", "itm_r_mean"):
        assert 0.0 <= m[key] <= 100.0


def test_every_recall_key_names_the_ranking_it_was_measured_on():
    """retrieval.json and the val rows hold three rankings' recalls; none is unprefixed (the
    re-ranked ones once were, beside prefixed ITC ones), and each table row reads its own."""
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    cfg = load_config("tiny", ["model.image_res=32", "model.vocab_size=50", "model.queue_size=64"])
    torch.manual_seed(0)
    m = evaluate(ALBEF(cfg.model), fake_split(), *fake_io(32, 50), k_test=3, batch_size=4)
    prefixes = [prefix for prefix, _ in RANKINGS]
    assert prefixes == ["itc_", "itm_", "itm_itc_"]
    recalls = {k for k in m if not k.startswith("chance_") and k not in ("num_images", "num_texts", "k_test")}
    assert recalls == {prefix + key for prefix in prefixes for key in RECALL_KEYS}, sorted(recalls)
    rows = ranking_rows(m)
    assert list(rows) == ["ITC only", "ITM re-rank k=3", "ITM + ITC re-rank k=3"]
    for (prefix, _), row in zip(RANKINGS, rows.values()):
        assert row == {key: m[prefix + key] for key in RECALL_KEYS}
    assert "ITM re-rank k=3" in format_table(rows)


def test_itm_plus_itc_reranking_matches_a_plain_computation():
    """``itm_itc_*``: the top k by ITC re-ranked by log p_ITM(match) + sim / temp, recomputed
    here with plain forwards, one pair at a time; the paper's keys (``itm_*``) rank by the ITM logit."""
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    n, caps, k, temp = 12, 2, 6, 0.5
    split = fake_split(n, caps)
    cfg = load_config("tiny", ["model.image_res=32", "model.vocab_size=50", "model.queue_size=64"])
    torch.manual_seed(1)
    model = ALBEF(cfg.model).eval()
    with torch.no_grad():
        model.temp.fill_(temp)
    load_images, tokenize = fake_io(32, 50)
    m = evaluate(model, split, load_images, tokenize, k_test=k, batch_size=5)

    with torch.no_grad():
        ids, mask = tokenize(split.texts)
        text = model.encode_text(ids, mask)
        images = model.encode_image(load_images(range(n)))
        sims = model.image_feat(images) @ model.text_feat(text, mask).t()

        def scores(i: int, t: int) -> tuple[float, float]:
            logits = model.itm_logits(model.fuse(text[t:t + 1], mask[t:t + 1], images[i:i + 1]), mask[t:t + 1])[0]
            return float(logits[1]), float(torch.log_softmax(logits, -1)[1] + sims[i, t] / temp)
        i2t = {key: torch.full(sims.shape, OUTSIDE_TOP_K) for key in ("itm_", "itm_itc_")}
        t2i = {key: torch.full(sims.t().shape, OUTSIDE_TOP_K) for key in ("itm_", "itm_itc_")}
        for i in range(n):
            for t in sims[i].topk(k).indices.tolist():
                i2t["itm_"][i, t], i2t["itm_itc_"][i, t] = scores(i, t)
        for t in range(n * caps):
            for i in sims[:, t].topk(k).indices.tolist():
                t2i["itm_"][t, i], t2i["itm_itc_"][t, i] = scores(i, t)
    for key in ("itm_", "itm_itc_"):
        for r in (1, 5):
            assert m[f"{key}txt_r{r}"] == pytest.approx(brute_recall(i2t[key].tolist(), split.img2txt, r))
            assert m[f"{key}img_r{r}"] == pytest.approx(brute_recall(t2i[key].tolist(), [[i] for i in split.txt2img], r))
    # on this model the three rankings differ, so none could pass for another
    figures = {key: tuple(m[f"{key}{d}_r{r}"] for d in ("txt", "img") for r in (1, 5)) for key in ("itc_", "itm_", "itm_itc_")}
    assert len(set(figures.values())) == 3, figures
