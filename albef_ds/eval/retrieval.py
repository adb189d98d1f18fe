"""Image-text retrieval as ALBEF evaluates it.

Encode every image and text, rank by ITC similarity, re-rank the top k of each query by
the ITM score of the fusion encoder; pairs outside the top k keep a very low score.
Report TR (image -> text, ``txt_r*``) and IR (text -> image, ``img_r*``) recall at 1/5/10
and their mean, with the chance level of each on the same split. Every recall key names
the ranking it was measured on: ``itc_`` (ITC alone), ``itm_`` (ITC's top k re-ranked by
the ITM score: the paper's) and ``itm_itc_`` (re-ranked by ITM + ITC): :data:`RANKINGS`.

Work is split over ranks in fixed chunks (chunk j on rank j mod world), so each number is
computed by the same operations whatever the world size: 2 ranks give exactly 1 rank's
results. Ties count against the query (a wrong candidate scored equal to the best right
one ranks ahead of it): a constant-score model must not look perfect.

Embeddings, features and scores are kept in float32, or in float64 for a float64 model
(``losses.at_least_fp32``): a float64 model is float64 end to end here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..losses import at_least_fp32, at_least_fp32_dtype

#: score given to pairs outside the re-ranked top k (ALBEF uses -100 as well).
OUTSIDE_TOP_K = -100.0

#: the key prefix of each ranking's recalls in an evaluate() result (retrieval.json, the
#: val rows of metrics.jsonl): ITC similarity alone; ITC's top k re-ranked by the ITM
#: "match" logit (the paper's figures); the top k re-ranked by ITM + ITC (:func:`itm_plus_itc`)
ITC, ITM_RERANK, ITM_ITC_RERANK = "itc_", "itm_", "itm_itc_"
#: the rankings an evaluate() result holds: (key prefix, name)
RANKINGS = ((ITC, "ITC only"), (ITM_RERANK, "ITM re-rank"), (ITM_ITC_RERANK, "ITM + ITC re-rank"))


@dataclass
class RetrievalSplit:
    images: list            # image paths
    texts: list             # captions (cleaned)
    img2txt: list = field(default_factory=list)  # per image: indices of its captions
    txt2img: list = field(default_factory=list)  # per caption: its image's index
    image_ids: Optional[list] = None


def split_from_entries(entries: Sequence[dict], clean: Callable[[str], str] = lambda s: s) -> RetrievalSplit:
    """ALBEF's test layout: [{"image": path, "caption": [c1, c2, ...]}, ...]; a str caption
    counts as one. Entries of the same image are merged."""
    split = RetrievalSplit([], [], [], [], [])
    index_of = {}
    for e in entries:
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        if e["image"] not in index_of:
            index_of[e["image"]] = len(split.images)
            split.images.append(e["image"])
            split.img2txt.append([])
            split.image_ids.append(e.get("image_id", len(split.images) - 1))
        i = index_of[e["image"]]
        for c in caps:
            split.img2txt[i].append(len(split.texts))
            split.txt2img.append(i)
            split.texts.append(clean(c))
    return split


# ------------------------------------------------------------------ ranking metrics

def ranks_of_truth(scores: np.ndarray, truths: Sequence[Sequence[int]]) -> np.ndarray:
    """For each query row, the 0-based rank of its best ground-truth candidate, ties
    counted against it: #(non-truth candidates scoring >= the best truth score)."""
    out = np.empty(len(scores), dtype=np.int64)
    for q, row in enumerate(scores):
        truth = np.zeros(row.shape[0], dtype=bool)
        truth[list(truths[q])] = True
        best = row[truth].max()
        out[q] = int((row[~truth] >= best).sum())
    return out


#: what :func:`recall_metrics` returns for one ranking (a result holds them behind the
#: ranking's prefix, :data:`RANKINGS`)
RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray,
                   img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> dict:
    tr = ranks_of_truth(scores_i2t, img2txt)
    ir = ranks_of_truth(scores_t2i, [[i] for i in txt2img])
    m = {}
    for k in (1, 5, 10):
        m[f"txt_r{k}"] = 100.0 * float((tr < k).mean())
        m[f"img_r{k}"] = 100.0 * float((ir < k).mean())
    m["txt_r_mean"] = (m["txt_r1"] + m["txt_r5"] + m["txt_r10"]) / 3
    m["img_r_mean"] = (m["img_r1"] + m["img_r5"] + m["img_r10"]) / 3
    m["r_mean"] = (m["txt_r_mean"] + m["img_r_mean"]) / 2
    return m


def _chance_hit(right: int, total: int, k: int) -> float:
    """P(at least one of ``right`` correct among ``total`` candidates in a uniformly random top k)."""
    k = min(k, total)
    if right <= 0:
        return 0.0
    if total - right < k:
        return 1.0
    return 1.0 - math.comb(total - right, k) / math.comb(total, k)


def chance_metrics(img2txt: Sequence[Sequence[int]], num_texts: int, num_images: int) -> dict:
    """R@1/5/10 (and their mean) of a uniformly random ranking: TR = mean over images of
    P(one of its captions in the top k) (k x #captions / #texts for small k), IR = k / #images."""
    out = {}
    counts = {}
    for t in img2txt:
        counts[len(t)] = counts.get(len(t), 0) + 1
    for k in (1, 5, 10):
        txt = sum(n * _chance_hit(c, num_texts, k) for c, n in counts.items()) / max(1, len(img2txt))
        out[f"chance_txt_r{k}"] = 100.0 * txt
        out[f"chance_img_r{k}"] = 100.0 * min(k, num_images) / num_images
    out["chance_r_mean"] = float(np.mean([out[f"chance_{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)]))
    return out


def chance_row(metrics: dict) -> dict:
    """The ``chance_*`` values of ``metrics`` under the table's column names."""
    return {k[len("chance_"):]: v for k, v in metrics.items() if k.startswith("chance_")}


# ------------------------------------------------------------------ re-ranking

def rerank(itc: torch.Tensor, k: int, itm_score: Callable[[int, torch.Tensor], torch.Tensor],
           queries: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of ``queries`` (rows of ``itc``): its top k candidates by ``itc`` and
    ``itm_score(query, candidates)`` for them: ([len(queries), k] indices, [len(queries), k,
    ...] scores). Only the top k are kept: :func:`scatter_top_k` makes the full matrix."""
    k = min(k, itc.shape[1])
    top = torch.stack([itc[q].topk(k).indices for q in queries]) if queries else torch.zeros(0, k, dtype=torch.long)
    scores = [at_least_fp32(itm_score(q, top[row])) for row, q in enumerate(queries)]
    return top, torch.stack(scores) if scores else torch.zeros(0, k)


def scatter_top_k(top: torch.Tensor, scores: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """The full score matrix [len(top), num_candidates]: ``scores`` at the ``top`` indices,
    :data:`OUTSIDE_TOP_K` elsewhere (below any re-ranked candidate); float32, or float64
    for float64 scores."""
    scores = at_least_fp32(scores)
    out = torch.full((top.shape[0], num_candidates), OUTSIDE_TOP_K, dtype=scores.dtype)
    return out.scatter_(1, top, scores)


def itm_plus_itc(itm_logits: torch.Tensor, itc_sims: torch.Tensor, temp: float) -> torch.Tensor:
    """The re-ranking score that adds ITC back: log p_ITM(match) + sim / temp, the sum of the
    two heads' log-odds (up to a constant per query), so a product of the two experts. ALBEF's
    Retrieval.py ranks the top k by the ITM logit alone; BLIP adds the cosine to it."""
    return torch.log_softmax(at_least_fp32(itm_logits), dim=-1)[..., 1] + at_least_fp32(itc_sims) / temp


# ------------------------------------------------------------------ model side

def chunks(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def evaluate(model, split: RetrievalSplit, load_images: Callable[[Sequence[int]], torch.Tensor],
             tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]],
             k_test: int, batch_size: int = 64, rank: int = 0, world_size: int = 1,
             all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             device: torch.device = torch.device("cpu"), progress: bool = False, stop=None) -> dict:
    """Retrieval metrics of ``model`` (an ALBEF) on ``split``: ITC alone (``itc_*`` keys),
    after ITM re-ranking of the top ``k_test`` (``itm_*``: the paper's), and re-ranked by
    :func:`itm_plus_itc` (``itm_itc_*``: the same ITM forward passes). ``all_reduce`` sums
    a tensor over ranks (None in one process). ``stop``: a StopFlag
    (albef_ds/train/stop.py), read between batches: a signal ends the evaluation there
    (``Interrupted``)."""
    from tqdm import tqdm

    model.eval()
    dtype = next(model.parameters()).dtype
    store = at_least_fp32_dtype(dtype)  # what embeddings, features and scores are kept in
    reduce = all_reduce or (lambda t: t)
    n_img, n_txt = len(split.images), len(split.texts)

    def mine(parts):
        return [c for j, c in enumerate(parts) if j % world_size == rank]

    def bar(chunk_list, desc: str):
        for c in tqdm(chunk_list, desc=desc, disable=not (progress and rank == 0), leave=False):
            if stop is not None:
                stop.raise_if_requested(f"the retrieval evaluation ({desc})")
            yield c

    # Encode, each rank its chunks; a sum over ranks assembles the full tensors.
    ids, mask = tokenize(split.texts)
    text_embeds = torch.zeros(n_txt, ids.shape[1], model.cfg.text_width, dtype=store)
    text_feat = torch.zeros(n_txt, model.cfg.embed_dim, dtype=store)
    for c in bar(mine(chunks(n_txt, batch_size)), "encode texts"):
        chunk_mask = mask[c.start:c.stop].to(device)
        e = model.encode_text(ids[c.start:c.stop].to(device), chunk_mask)
        text_embeds[c.start:c.stop] = e.to(store).cpu()
        text_feat[c.start:c.stop] = model.text_feat(e, chunk_mask).to(store).cpu()
    tokens = (model.cfg.image_res // model.cfg.patch_size) ** 2 + 1
    image_embeds = torch.zeros(n_img, tokens, model.cfg.vision_width, dtype=store)
    image_feat = torch.zeros(n_img, model.cfg.embed_dim, dtype=store)
    for c in bar(mine(chunks(n_img, batch_size)), "encode images"):
        e = model.encode_image(load_images(c).to(device, dtype))
        image_embeds[c.start:c.stop] = e.to(store).cpu()
        image_feat[c.start:c.stop] = model.image_feat(e).to(store).cpu()
    text_embeds, text_feat = reduce(text_embeds), reduce(text_feat)
    image_embeds, image_feat = reduce(image_embeds), reduce(image_feat)

    sims = image_feat @ text_feat.t()  # [n_img, n_txt]
    metrics = with_prefix(ITC, recall_metrics(sims.numpy(), sims.t().numpy(), split.img2txt, split.txt2img))

    def itm(text_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        fused = model.fuse(text_embeds[text_idx].to(device, dtype), mask[text_idx].to(device),
                           image_embeds[image_idx].to(device, dtype))
        return model.itm_logits(fused, mask[text_idx].to(device)).to(store).cpu()  # [k, 2]

    # Re-rank: each rank scores its chunks of queries; zeros elsewhere, summed over ranks.
    # Only the top k of each query travel (indices as float64: exact below 2^53).
    def rerank_all(itc: torch.Tensor, pair: Callable[[int, torch.Tensor], tuple], desc: str):
        n_q = itc.shape[0]
        k = min(k_test, itc.shape[1])
        top, logits = torch.zeros(n_q, k, dtype=torch.float64), torch.zeros(n_q, k, 2, dtype=store)
        for c in bar(mine(chunks(n_q, batch_size)), desc):
            t, s = rerank(itc, k, lambda q, cand: itm(*pair(q, cand)), list(c))
            top[c.start:c.stop], logits[c.start:c.stop] = t.double(), s
        top, logits = reduce(top).long(), reduce(logits)
        return top, logits, itc.gather(1, top)
    i2t = rerank_all(sims, lambda q, top: (top, torch.full_like(top, q)), "re-rank images")
    t2i = rerank_all(sims.t().contiguous(), lambda q, top: (torch.full_like(top, q), top), "re-rank texts")

    def ranked(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
        return recall_metrics(scatter_top_k(i2t[0], score(i2t[1], i2t[2]), n_txt).numpy(),
                              scatter_top_k(t2i[0], score(t2i[1], t2i[2]), n_img).numpy(),
                              split.img2txt, split.txt2img)
    # the paper's: the ITM logit of "match" alone
    metrics.update(with_prefix(ITM_RERANK, ranked(lambda logits, _: logits[..., 1])))
    temp = float(model.temp.detach())  # kept within its bounds by training
    metrics.update(with_prefix(ITM_ITC_RERANK, ranked(lambda logits, itc: itm_plus_itc(logits, itc, temp))))
    metrics.update(chance_metrics(split.img2txt, n_txt, n_img))
    metrics.update({"num_images": n_img, "num_texts": n_txt, "k_test": k_test})
    return metrics


def with_prefix(prefix: str, recalls: dict) -> dict:
    return {f"{prefix}{key}": v for key, v in recalls.items()}


def recalls_of(metrics: dict, prefix: str) -> dict:
    """One ranking's :data:`RECALL_KEYS` from an evaluate() result, without its prefix
    (exact keys: ``itm_`` is also the start of ``itm_itc_``)."""
    return {key: metrics[prefix + key] for key in RECALL_KEYS if prefix + key in metrics}


def ranking_rows(metrics: dict, label: str = "") -> dict[str, dict]:
    """:func:`format_table` rows, one per ranking in ``metrics`` (an evaluate() result),
    named ``label`` + the ranking (+ its depth k for the re-rankings)."""
    rows = {}
    for prefix, name in RANKINGS:
        if f"{prefix}txt_r1" not in metrics:
            continue  # a result from before that ranking existed
        depth = "" if prefix == ITC else f" k={metrics.get('k_test', '?')}"
        rows[f"{label}{name}{depth}"] = recalls_of(metrics, prefix)
    return rows


def format_table(rows: dict[str, dict]) -> str:
    """A small text table: one row per named result, TR/IR R@1/5/10 and the mean."""
    cols = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
    width = max([24] + [len(name) + 1 for name in rows])
    head = f"{'':{width}s}" + "".join(f"{c:>9s}" for c in cols)
    lines = [head]
    for name, m in rows.items():
        # a value the row does not have prints as a dash, never 'nan'
        cells = (f"{m[c]:9.2f}" if isinstance(m.get(c), (int, float)) and not math.isnan(m[c]) else f"{'-':>9s}"
                 for c in cols)
        lines.append(f"{name:{width}s}" + "".join(cells))
    return "\n".join(lines)
