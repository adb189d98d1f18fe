"""Numerics of the components: float64 attention with no fp32 detour, the losses in the
input dtype or fp32 whichever is wider (bf16 still in fp32), and seeded ITM draws in the
reference's order (negative images first, then negative texts). The float64 forward
against a brute force of its losses is tests/objectives/test_pretrain_float64.py.

Brute forces here are written plainly (loops, x - logsumexp) and never call albef_ds.losses;
the encoders they read features from are checked against transformers elsewhere.
"""
import math

import pytest
import torch

from albef_ds import losses
from albef_ds.config import ModelConfig
from albef_ds.models.bert import BertSelfAttention
from albef_ds.objectives.pretrain import albef_forward

# the tiny model and batch of the ALBEF tests, and their one-thread fixture (autouse, so
# importing it applies it here too)
from tests.support.tiny import make_batch, make_model, one_thread, small_config, stir  # noqa: F401

IGNORE = -100


def train_forward(model, **kw):
    return model(albef_forward, **kw)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Over the last dim, written out (not F.log_softmax)."""
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def double_batch(seed):
    batch = make_batch(seed=seed)
    batch["images"] = batch["images"].double()
    return batch


# ----------------------------------------------------------------- C2: float64 attention

def attention_case(dtype, seed=0, b=3, lq=7, lk=9, width=32, heads=4):
    spec = ModelConfig(text_width=width, text_heads=heads, attention_dropout=0.0, sdpa=False)
    attn = BertSelfAttention(spec, kv_width=width)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            # weights large enough that the scores spread over several units: the softmax
            # is far from uniform, so its rounding shows in the output
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    hidden = torch.randn(b, lq, width, generator=g)
    source = torch.randn(b, lk, width, generator=g)
    keep = torch.ones(b, lk)
    keep[1, 5:] = 0
    keep[2, 2:] = 0
    return attn.to(dtype), hidden.to(dtype), source.to(dtype), keep


def brute_force_attention(attn, hidden, source, keep):
    """softmax(Q K^T / sqrt(d) + mask) V, head by head, row by row, in the inputs' dtype."""
    heads, d = attn.num_heads, attn.head_dim
    q = hidden @ attn.query.weight.t() + attn.query.bias
    k = source @ attn.key.weight.t() + attn.key.bias
    v = source @ attn.value.weight.t() + attn.value.bias
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in range(q.shape[1]):
                scores = k[b, :, cols] @ q[b, i, cols] / math.sqrt(d)
                scores = scores.masked_fill(keep[b] == 0, float("-inf"))
                probs = (scores - torch.logsumexp(scores, 0)).exp()
                out[b, i, cols] = probs @ v[b, :, cols]
    return out


def additive(keep, dtype):
    return ((1.0 - keep.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]


@torch.no_grad()
def attention_error(cross):
    """Max |module - float64 brute force| for a float64 explicit-path attention, and the
    same brute force run in float32 (what an fp32 detour would be near)."""
    attn, hidden, source, keep = attention_case(torch.float64)
    src = source if cross else hidden
    keep = keep if cross else torch.ones(hidden.shape[:2])
    got = attn(hidden, additive(keep, torch.float64), source=src if cross else None)
    want = brute_force_attention(attn, hidden, src, keep)
    fp32 = brute_force_attention(attn.float(), hidden.float(), src.float(), keep).double()
    return (got - want).abs().max().item(), (fp32 - want).abs().max().item()


@pytest.mark.parametrize("cross", [False, True])
def test_float64_explicit_attention_matches_a_float64_brute_force(cross):
    err, fp32_err = attention_error(cross)
    # the tolerance has teeth: float32 anywhere in the path lands far outside it
    assert fp32_err > 1e-9
    assert err <= 1e-12, f"|attention - brute force| = {err:.3g} (fp32 would be off by {fp32_err:.3g})"


def test_bf16_explicit_attention_still_takes_its_softmax_in_fp32():
    """Unchanged bf16 behaviour: scores in bf16, softmax in fp32, probabilities back to bf16."""
    attn, hidden, source, keep = attention_case(torch.bfloat16, seed=1)
    mask = additive(keep, torch.bfloat16)
    with torch.no_grad():
        got = attn(hidden, mask, source=source)
        q, (k, v) = attn.split_heads(attn.query(hidden)), attn.kv(source)
        scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim) + mask
        want = (scores.float().softmax(-1).bfloat16() @ v).transpose(1, 2).reshape(got.shape)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


# ----------------------------------------------------------------- C3: ITM draw order

def reference_weights(model, batch):
    """Sampling weights as ALBEF_FACTS says: softmax over the batch of online features
    against momentum features / temp, the positive and same-image pairs excluded."""
    ids, mask, image_ids = batch["text_ids"], batch["text_mask"], batch["image_ids"]
    with torch.no_grad():
        image_feat = model.image_feat(model.encode_image(batch["images"]))
        text_feat = model.text_feat(model.encode_text(ids, mask), mask)
        image_m = model.image_feat(model.encode_image(batch["images"], momentum=True), momentum=True)
        text_m = model.text_feat(model.encode_text(ids, mask, momentum=True), mask, momentum=True)
        same = image_ids[:, None] == image_ids[None, :]
        temp = model.temp.clamp(0.001, 0.5)
        w_i2t = (image_feat @ text_m.t() / temp).masked_fill(same, float("-inf")).softmax(1)
        w_t2i = (text_feat @ image_m.t() / temp).masked_fill(same, float("-inf")).softmax(1)
    return w_i2t, w_t2i


def loop_draws(w_first, w_second, seed):
    """Per-row torch.multinomial, every row of ``w_first``, then every row of ``w_second``."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.multinomial(w_first[b], 1, generator=g)[0] for b in range(len(w_first))])
    second = torch.stack([torch.multinomial(w_second[b], 1, generator=g)[0] for b in range(len(w_second))])
    return first, second


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeded_itm_draws_are_images_first_like_the_reference(seed, vectorized, dtype):
    cfg = small_config(f"model.itm_vectorized_sampling={str(vectorized).lower()}")
    model = stir(make_model(cfg)).to(dtype)
    batch = make_batch(seed=6)
    batch["images"] = batch["images"].to(dtype)
    w_i2t, w_t2i = reference_weights(model, batch)
    with torch.no_grad():
        out = train_forward(model, **batch, alpha=0.0, itm_negatives=None,
                            generator=torch.Generator().manual_seed(seed))
    neg_image, neg_text = loop_draws(w_t2i, w_i2t, seed)
    assert torch.equal(out["neg_image_idx"], neg_image)
    assert torch.equal(out["neg_text_idx"], neg_text)
    # teeth: drawing texts first from the same generator gives other negatives here
    neg_text_first, neg_image_second = loop_draws(w_i2t, w_t2i, seed)
    assert not (torch.equal(neg_text_first, neg_text) and torch.equal(neg_image_second, neg_image))


def test_vectorized_and_per_row_sampling_consume_the_generator_identically():
    """losses.sample_negatives' claim, over uneven weights (zeros, near-one-hot rows) and a
    second draw from the same generator (so the amount consumed matches too)."""
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(16, 11, generator=g) ** 4
    weights[torch.arange(16), torch.arange(16) % 11] = 0.0
    weights[3] = 0.0
    weights[3, 7] = 1.0
    for dtype in (torch.float32, torch.float64):
        w = (weights / weights.sum(1, keepdim=True)).to(dtype)
        fast_g, slow_g = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        fast = [losses.sample_negatives(w, fast_g, vectorized=True) for _ in range(2)]
        slow = [losses.sample_negatives(w, slow_g, vectorized=False) for _ in range(2)]
        ref = loop_draws(w, w, 9)
        for a, b, c in zip(fast, slow, ref):
            assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------- C4: dtypes of the losses

@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_losses_compute_in_the_input_dtype_or_fp32_whichever_is_wider(dtype, expected):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(9, 2, generator=g)).to(dtype)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert losses.itm_loss(logits, labels).dtype == expected

    mlm_logits = (3 * torch.randn(5, 7, generator=g)).to(dtype)
    mlm_m = (3 * torch.randn(5, 7, generator=g)).to(dtype)
    mlm_labels = torch.tensor([1, IGNORE, 3, 0, IGNORE])
    assert losses.mlm_loss(mlm_logits, mlm_labels, mlm_m, 0.4).dtype == expected

    sim = (10 * torch.randn(6, 6, generator=g)).to(dtype)
    weights, _ = losses.itm_weights(sim, torch.arange(6))
    assert weights.dtype == expected

    ids = torch.tensor([0, 1, 0])
    assert losses.diagonal_targets(3, 5, 0, dtype=expected).dtype == expected
    assert losses.id_targets(ids, ids, dtype=expected).dtype == expected


def test_id_targets_are_exact_in_float64():
    ids = torch.tensor([0, 0, 0, 1])
    targets = losses.id_targets(ids, ids, dtype=torch.float64)
    assert targets[0, 0].item() == 1 / 3  # not 1/3 rounded to fp32


def test_bf16_losses_match_fp32_on_the_same_values():
    """bf16 in, fp32 out, equal to fp32 computed on the bf16 values (the upcast happens
    before any arithmetic), and to a float64 brute force to fp32 precision."""
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(12, 2, generator=g)).bfloat16()
    labels = torch.tensor([1] * 4 + [0] * 8)
    got = losses.itm_loss(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, losses.itm_loss(logits.float(), labels), rtol=0, atol=0)
    brute = sum(-log_softmax(logits[i].double())[labels[i]] for i in range(12)) / 12
    assert abs(got.item() - brute.item()) < 1e-6

    mlm_logits = (3 * torch.randn(6, 9, generator=g)).bfloat16()
    mlm_m = (3 * torch.randn(6, 9, generator=g)).bfloat16()
    mlm_labels = torch.tensor([1, IGNORE, 3, 0, IGNORE, 8])
    got = losses.mlm_loss(mlm_logits, mlm_labels, mlm_m, 0.4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, losses.mlm_loss(mlm_logits.float(), mlm_labels, mlm_m.float(), 0.4),
                               rtol=0, atol=0)


def test_queues_stay_fp32_under_bf16_and_follow_float64():
    model = make_model(small_config())
    assert model.bfloat16().image_queue.dtype == torch.float32
    assert model.double().image_queue.dtype == model.double().text_queue.dtype == torch.float64
