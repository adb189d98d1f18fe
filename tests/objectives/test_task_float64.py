"""Float64 end to end in the task paths: a float64 model's VQA and text-assignment losses
against plain float64 computations written here, retrieval evaluation keeping scores apart
that differ below float32's resolution, and Grad-CAM maps that do not depend on how far the
texts are padded. A float32 detour (a ``.float()``, float32 answer weights or score storage)
leaves relative errors of ~1e-8 or more, far above the 1e-10 asserted; float64 noise is ~1e-15."""
import types

import torch
import torch.nn.functional as F

from albef_ds.objectives.grounding import GroundingObjective
from albef_ds.objectives.nlvr_ta import assign_images
from albef_ds.train.trainer import build_model, make_objective
from tests.support.layouts import randomise, small_cfg

RTOL = 1e-10


def float64_model(task, seed=1):
    cfg = small_cfg(task)
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    objective = make_objective(cfg, None)
    model = build_model(cfg, log=lambda *a: None, objective=objective)
    randomise(model, seed)  # the momentum weights too: they differ from the online ones
    return objective, model.double().eval()


def ids_and_mask(rows, length, vocab, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    ids[:, 0] = 2
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def log_softmax(row):
    return row - torch.logsumexp(row, dim=0)


def close(got, want):
    assert got.dtype == torch.float64
    assert abs(float(got) - float(want)) <= RTOL * abs(float(want)), (float(got), float(want))


def test_vqa_loss_is_float64_and_equals_a_plain_computation():
    objective, model = float64_model("vqa")
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    q_ids, q_mask = ids_and_mask(2, 7, vocab, 4, [7, 4])
    a_ids, a_mask = ids_and_mask(3, 5, vocab, 5, [5, 3, 4])
    counts = torch.tensor([2, 1])
    shares = [1 / 3, 2 / 3, 1.0]  # annotator shares: 1/3 is not a float32 number
    weights = torch.tensor(shares, dtype=torch.float64)  # as collate makes them
    alpha = 0.4
    with torch.no_grad():
        out = objective.compute(model, images, q_ids, q_mask, a_ids, a_mask, counts, weights, alpha)

        rows = [0, 0, 1]
        states = objective.fused_questions(model, images, q_ids, q_mask)
        states_m = objective.fused_questions(model, images, q_ids, q_mask, momentum=True)
        want = 0.0
        for a, q in enumerate(rows):
            logits = model.text_decoder(a_ids[a:a + 1], a_mask[a:a + 1], states[q:q + 1], q_mask[q:q + 1])[0]
            logits_m = model.text_decoder_m(a_ids[a:a + 1], a_mask[a:a + 1], states_m[q:q + 1], q_mask[q:q + 1])[0]
            nll = distill = 0.0
            for t in range(a_ids.shape[1] - 1):
                if a_mask[a, t + 1]:
                    lp = log_softmax(logits[t])
                    nll = nll - lp[a_ids[a, t + 1]]
                    distill = distill - (torch.exp(log_softmax(logits_m[t])) * lp).sum()
            want = want + shares[a] * ((1 - alpha) * nll + alpha * distill)
        want = want / 2
    close(out["loss"], want)


def test_vqa_collate_keeps_the_annotator_shares_exact(tmp_path):
    from albef_ds.tokenizer import build_vocab
    objective, _ = float64_model("vqa")
    objective.tokenizer = build_vocab(["what colour is it red blue"] * 5, tmp_path / "tok", vocab_size=60)
    batch = objective.collate([{"image": torch.zeros(3, 4, 4), "question": "what colour", "answers": ["red", "blue"],
                                "weights": [1 / 3, 2 / 3], "question_id": 0, "human": None, "key": "0"}])
    assert batch["answer_weights"].dtype == torch.float64 and batch["answer_weights"].tolist() == [1 / 3, 2 / 3]


def test_text_assignment_loss_is_float64_and_equals_a_plain_computation():
    objective, model = float64_model("nlvr_ta")
    g = torch.Generator().manual_seed(6)
    images = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    ids, mask = ids_and_mask(4, 6, model.cfg.vocab_size, 7, [6, 3, 5, 4])
    with torch.no_grad():
        out = objective.compute(model, images, ids, mask, torch.Generator().manual_seed(8))
        image_embeds = model.encode_image(images)
        left, right, labels = assign_images(model.image_feat(image_embeds), torch.Generator().manual_seed(8))
        fused = model.fuse(model.encode_text(ids, mask), mask, [image_embeds[left], image_embeds[right]])
        logits = model.ta_head(fused[:, 0])
        want = sum(-log_softmax(logits[i])[labels[i]] for i in range(4)) / 4
    close(out["loss"], want)


# ----------------------------------------------------------------------------- retrieval

class NearTieModel(torch.nn.Module):
    """A stand-in for ALBEF whose ITC similarities and ITM logits are the matrix ``S``
    (image x text), float64: features carry their row index through the encoders."""

    def __init__(self, sims):
        super().__init__()
        self.S = sims
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # the model's dtype
        self.temp = torch.tensor([1.0], dtype=torch.float64)
        self.cfg = types.SimpleNamespace(text_width=2, embed_dim=sims.shape[1], image_res=16, patch_size=16,
                                         vision_width=1)

    def encode_text(self, ids, mask):
        out = torch.zeros(ids.shape[0], ids.shape[1], 2, dtype=torch.float64)
        out[:, 0, 0] = ids[:, 1].double()  # the text's index
        return out

    def text_feat(self, embeds, mask):
        return F.one_hot(embeds[:, 0, 0].long(), self.S.shape[1]).double()

    def encode_image(self, images):
        out = torch.zeros(images.shape[0], 2, 1, dtype=torch.float64)
        out[:, 0, 0] = images[:, 0, 0, 0]
        return out

    def image_feat(self, embeds):
        return self.S[embeds[:, 0, 0].long()]

    def fuse(self, text_embeds, mask, image_embeds):
        out = text_embeds.clone()
        out[:, 0, 1] = image_embeds[:, 0, 0]
        return out

    def itm_logits(self, fused, mask):
        t, i = fused[:, 0, 0].long(), fused[:, 0, 1].long()
        return torch.stack([torch.zeros_like(fused[:, 0, 0]), self.S[i, t]], dim=1)


def test_retrieval_keeps_float64_scores_apart():
    from albef_ds.eval.retrieval import RetrievalSplit, evaluate
    eps = 1e-10  # below float32's resolution at 0.5 (~3e-8): float32 storage would tie them
    sims = torch.tensor([[0.5 + eps, 0.1, 0.5, 0.2],
                         [0.3, 0.5, 0.5 + eps, 0.1]], dtype=torch.float64)
    assert float(sims[0, 0].float()) == float(sims[0, 2].float())
    split = RetrievalSplit(["a", "b"], ["t0", "t1", "t2", "t3"], [[0, 1], [2, 3]], [0, 0, 1, 1])

    def load_images(indices):
        return torch.stack([torch.full((3, 16, 16), float(i)) for i in indices])

    def tokenize(texts):
        ids = torch.tensor([[2, i] for i in range(len(texts))])
        return ids, torch.ones_like(ids)
    m = evaluate(NearTieModel(sims), split, load_images, tokenize, k_test=4, batch_size=3)
    # each image's own caption is ahead of the other's by eps: right at rank 1 (a tie counts against)
    assert m["itc_txt_r1"] == m["itm_txt_r1"] == m["itm_itc_txt_r1"] == 100.0


# ----------------------------------------------------------------------------- Grad-CAM

def test_gradcam_maps_do_not_depend_on_the_padding_length():
    cfg = small_cfg("grounding")
    objective = make_objective(cfg, None)
    _, model = float64_model("grounding")
    g = torch.Generator().manual_seed(9)
    images = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    ids, mask = ids_and_mask(3, 8, model.cfg.vocab_size, 10, [8, 3, 5])
    longer_ids = torch.cat([ids, torch.zeros(3, 9, dtype=torch.long)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 9, dtype=torch.long)], dim=1)
    short = GroundingObjective(objective.cfg, None).maps(model, images, ids, mask)
    long = GroundingObjective(objective.cfg, None).maps(model, images, longer_ids, longer_mask)
    assert short.dtype == torch.float64 and (short > 0).any()
    torch.testing.assert_close(long, short, rtol=RTOL, atol=0)
