"""albef_ds.losses against computations written out plainly here (loops over rows,
explicit exp/log in float64), never against the library's own helpers.

Formulas: ../shared/reference/ALBEF_FACTS.md (ITC + MoD, ITM sampling, MLM masking + MoD).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from albef_ds import losses

IGNORE = -100


def normalized(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


# ----------------------------------------------------------------------------- ITC + MoD

def brute_force_itc(image_feat, text_feat, image_feat_m, text_feat_m,
                    image_cands_m, text_cands_m, positives, temp, alpha):
    """ALBEF_FACTS: sim = feat @ cands / temp; targets = alpha * softmax(momentum sim)
    + (1 - alpha) * ground truth; loss = -(log_softmax(sim) * targets).sum(1).mean(),
    averaged over the two directions. ``positives[i]`` is the list of candidate columns that
    are row i's ground truth (uniform over them). One row at a time, float64."""
    def one_direction(feat, feat_m, cands_m):
        total = 0.0
        for i in range(feat.shape[0]):
            sims = [float(feat[i].double() @ c.double()) / temp for c in cands_m]
            sims_m = [float(feat_m[i].double() @ c.double()) / temp for c in cands_m]
            log_z = math.log(sum(math.exp(s) for s in sims))
            z_m = sum(math.exp(s) for s in sims_m)
            row = 0.0
            for k in range(len(cands_m)):
                truth = 1.0 / len(positives[i]) if k in positives[i] else 0.0
                target = alpha * math.exp(sims_m[k]) / z_m + (1 - alpha) * truth
                row -= target * (sims[k] - log_z)
            total += row
        return total / feat.shape[0]

    return (one_direction(image_feat, image_feat_m, text_cands_m)
            + one_direction(text_feat, text_feat_m, image_cands_m)) / 2


def itc_case(batch=4, dim=8, queue=12, world=1, rank=0, seed=0):
    """Features of a local batch, in-batch candidates of a ``world``-rank global batch
    (this rank's block at ``rank * batch``), then a queue."""
    g = torch.Generator().manual_seed(seed)
    image_feat, text_feat = normalized(batch, dim, generator=g), normalized(batch, dim, generator=g)
    # momentum features near the online ones, as after some EMA steps
    image_feat_m = F.normalize(image_feat + 0.3 * torch.randn(batch, dim, generator=g), dim=-1)
    text_feat_m = F.normalize(text_feat + 0.3 * torch.randn(batch, dim, generator=g), dim=-1)
    others_i = [normalized(batch, dim, generator=g) for _ in range(world)]
    others_t = [normalized(batch, dim, generator=g) for _ in range(world)]
    others_i[rank], others_t[rank] = image_feat_m, text_feat_m
    image_cands = torch.cat(others_i + [normalized(queue, dim, generator=g)])
    text_cands = torch.cat(others_t + [normalized(queue, dim, generator=g)])
    return image_feat, text_feat, image_feat_m, text_feat_m, image_cands, text_cands


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("world,rank", [(1, 0), (3, 1)])
def test_itc_with_momentum_distillation_equals_brute_force(alpha, world, rank):
    batch, temp = 4, 0.07
    feats = itc_case(batch=batch, world=world, rank=rank, seed=1 + rank)
    num_cands = feats[4].shape[0]
    offset = rank * batch
    targets = losses.diagonal_targets(batch, num_cands, offset)
    loss, sim_i2t, sim_t2i = losses.itc_loss(*feats, targets, torch.tensor(temp), alpha)
    expected = brute_force_itc(*feats, [[offset + i] for i in range(batch)], temp, alpha)
    assert sim_i2t.shape == sim_t2i.shape == (batch, num_cands)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_itc_alpha_zero_is_cross_entropy_on_the_offset_diagonal():
    batch, world, rank, temp = 4, 2, 1, 0.1
    image_feat, text_feat, image_feat_m, text_feat_m, image_cands, text_cands = itc_case(
        batch=batch, world=world, rank=rank, seed=3)
    offset = rank * batch
    targets = losses.diagonal_targets(batch, image_cands.shape[0], offset)
    loss, _, _ = losses.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                 image_cands, text_cands, targets, torch.tensor(temp), 0.0)
    labels = offset + torch.arange(batch)
    expected = (F.cross_entropy(image_feat @ text_cands.t() / temp, labels)
                + F.cross_entropy(text_feat @ image_cands.t() / temp, labels)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_itc_gradient_reaches_online_features_and_temp_only():
    feats = list(itc_case(seed=4))
    for t in feats[:2]:
        t.requires_grad_(True)
    temp = torch.tensor(0.07, requires_grad=True)
    targets = losses.diagonal_targets(4, feats[4].shape[0], 0)
    loss, _, _ = losses.itc_loss(*feats, targets, temp, 0.4)
    loss.backward()
    assert feats[0].grad is not None and feats[1].grad is not None and temp.grad is not None
    assert all(t.grad is None for t in feats[2:])


def test_id_targets_are_uniform_over_same_image_candidates():
    row_ids = torch.tensor([7, 8, 7])
    cand_ids = torch.tensor([7, 8, 7, 9, 7, 8])
    targets = losses.id_targets(row_ids, cand_ids)
    expected = torch.tensor([[1 / 3, 0, 1 / 3, 0, 1 / 3, 0],
                             [0, 1 / 2, 0, 0, 0, 1 / 2],
                             [1 / 3, 0, 1 / 3, 0, 1 / 3, 0]])
    torch.testing.assert_close(targets, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_with_id_targets_equals_brute_force(alpha):
    batch, temp = 4, 0.05
    feats = itc_case(batch=batch, queue=4, seed=5)
    # image ids of the 4 in-batch candidates then the 4 queue entries: rows 0 and 2 show
    # the same image, and so do two queue entries.
    cand_ids = torch.tensor([1, 2, 1, 3, 9, 1, 2, 8])
    row_ids = cand_ids[:batch]
    targets = losses.id_targets(row_ids, cand_ids)
    loss, _, _ = losses.itc_loss(*feats, targets, torch.tensor(temp), alpha)
    positives = [[k for k in range(len(cand_ids)) if cand_ids[k] == row_ids[i]] for i in range(batch)]
    assert positives[0] == [0, 2, 5]
    expected = brute_force_itc(*feats, positives, temp, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- queue

def test_enqueue_writes_transposed_features_at_the_pointer_and_wraps():
    dim, size, n = 6, 12, 4
    g = torch.Generator().manual_seed(0)
    queue = torch.randn(dim, size, generator=g)
    ptr = torch.zeros(1, dtype=torch.long)
    for write in range(size // n):
        before = queue.clone()
        feats = torch.randn(n, dim, generator=g)
        start = int(ptr)
        assert start == write * n
        losses.enqueue(queue, ptr, feats)
        for j in range(n):  # column start + j holds feature j
            assert torch.equal(queue[:, start + j], feats[j])
        untouched = [c for c in range(size) if not start <= c < start + n]
        assert torch.equal(queue[:, untouched], before[:, untouched])
    assert int(ptr) == 0  # wrapped after size / n writes
    feats = torch.randn(n, dim, generator=g)
    losses.enqueue(queue, ptr, feats)
    assert torch.equal(queue[:, :n], feats.t()) and int(ptr) == n


def test_enqueue_keeps_the_queue_dtype():
    queue = torch.zeros(4, 8)
    ptr = torch.zeros(1, dtype=torch.long)
    feats = torch.randn(2, 4).bfloat16()
    losses.enqueue(queue, ptr, feats)
    assert queue.dtype == torch.float32
    assert torch.equal(queue[:, :2], feats.float().t())


def test_enqueue_rejects_a_batch_that_does_not_divide_the_queue():
    queue = torch.zeros(4, 10)
    ptr = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple"):
        losses.enqueue(queue, ptr, torch.randn(4, 4))
    assert int(ptr) == 0 and torch.equal(queue, torch.zeros(4, 10))


# ----------------------------------------------------------------------------- ITM

def itm_case(seed=0):
    """6 rows against 6 in-batch candidates; images repeat: rows 0, 3 share an image and
    rows 1, 4, 5 share another."""
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(6, 6, generator=g) * 3
    ids = torch.tensor([10, 11, 12, 10, 11, 11])
    pos = torch.arange(6)
    return sim, pos, ids


def brute_force_weights(sim, pos, ids=None):
    """softmax over the allowed candidates (not the positive, not the same image), float64."""
    out = torch.zeros(sim.shape, dtype=torch.float64)
    for i in range(sim.shape[0]):
        allowed = [k for k in range(sim.shape[1])
                   if k != pos[i] and (ids is None or ids[k] != ids[i])]
        z = sum(math.exp(float(sim[i, k])) for k in allowed)
        for k in allowed:
            out[i, k] = math.exp(float(sim[i, k])) / z
    return out


def test_itm_weights_exclude_the_positive_and_same_image_pairs():
    sim, pos, ids = itm_case()
    weights, empty = losses.itm_weights(sim, pos, ids, ids)
    torch.testing.assert_close(weights.double(), brute_force_weights(sim, pos, ids), rtol=1e-5, atol=1e-7)
    assert not empty.any()
    same = ids[:, None] == ids[None, :]
    assert (weights[same] == 0).all()
    # without ids only the positive is excluded
    weights, _ = losses.itm_weights(sim, pos)
    torch.testing.assert_close(weights.double(), brute_force_weights(sim, pos), rtol=1e-5, atol=1e-7)


def test_itm_weights_with_an_offset_positive_over_global_candidates():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(3, 9, generator=g)
    pos = 3 + torch.arange(3)  # rank 1 of 3, local batch 3
    weights, _ = losses.itm_weights(sim, pos)
    assert (weights[torch.arange(3), pos] == 0).all()
    torch.testing.assert_close(weights.double(), brute_force_weights(sim, pos), rtol=1e-5, atol=1e-7)


def test_itm_rows_without_a_valid_candidate_fall_back_to_uniform_and_are_flagged():
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(4)
    # rows 0..2 show one image, row 3 another: row 3 may pair with any of 0..2, and rows
    # 0..2 only with row 3 (one valid candidate each, not empty)
    ids = torch.tensor([5, 5, 5, 7])
    weights, empty = losses.itm_weights(sim, pos, ids, ids)
    assert not empty.any()
    for i in range(3):
        assert weights[i].tolist() == pytest.approx([0, 0, 0, 1])
    assert weights[3, 3] == 0 and weights[3].sum().item() == pytest.approx(1.0)
    # every pair shows the same image: no valid candidate anywhere -> flagged, uniform over
    # every column but the positive (better a false negative than a crash in multinomial)
    ids = torch.tensor([5, 5, 5, 5])
    weights, empty = losses.itm_weights(sim, pos, ids, ids)
    assert empty.tolist() == [True] * 4
    for i in range(4):
        expected = [0.0 if k == i else 1 / 3 for k in range(4)]
        assert weights[i].tolist() == pytest.approx(expected)
    draws = losses.sample_negatives(weights.repeat(200, 1), torch.Generator().manual_seed(0))
    assert not (draws.view(200, 4) == pos).any()


def test_itm_weights_are_fp32_for_bf16_similarities():
    sim, pos, ids = itm_case(seed=2)
    sim = (sim * 40).bfloat16()  # large gaps: a bf16 softmax would round many weights away
    weights, _ = losses.itm_weights(sim, pos, ids, ids)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), brute_force_weights(sim.float(), pos, ids), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))


def test_itm_sampling_never_returns_the_positive_or_a_same_image_pair():
    sim, pos, ids = itm_case(seed=3)
    weights, _ = losses.itm_weights(sim, pos, ids, ids)
    reps = 2000
    gen = torch.Generator().manual_seed(0)
    draws = losses.sample_negatives(weights.repeat(reps, 1), gen).view(reps, 6)
    row_ids = ids[None, :].expand(reps, 6)
    assert not (draws == pos).any()
    assert not (ids[draws] == row_ids).any()


def test_itm_sampling_frequencies_match_the_softmax_weights():
    """Chi-square goodness of fit per row, 20,000 draws per row (seeded: deterministic)."""
    sim, pos, ids = itm_case(seed=4)
    sim = sim / 3  # moderate weights so that every allowed column is drawn often
    weights, _ = losses.itm_weights(sim, pos, ids, ids)
    expected = brute_force_weights(sim, pos, ids)
    draws_per_row = 20000
    gen = torch.Generator().manual_seed(1234)
    draws = losses.sample_negatives(weights.repeat(draws_per_row, 1), gen).view(draws_per_row, 6)
    for i in range(6):
        allowed = expected[i] > 0
        counts = torch.bincount(draws[:, i], minlength=6).double()
        assert counts[~allowed].sum() == 0
        if allowed.sum() < 2:
            continue
        stat, p = chisquare(counts[allowed].numpy(), draws_per_row * expected[i][allowed].numpy())
        assert p > 1e-3, f"row {i}: chi2={stat:.1f}, p={p:.2g}, counts {counts.tolist()}"


def test_vectorized_and_loop_sampling_draw_the_same_indices():
    sim, pos, ids = itm_case(seed=5)
    weights, _ = losses.itm_weights(sim, pos, ids, ids)
    weights = weights.repeat(20, 1)
    fast = losses.sample_negatives(weights, torch.Generator().manual_seed(7), vectorized=True)
    slow = losses.sample_negatives(weights, torch.Generator().manual_seed(7), vectorized=False)
    assert torch.equal(fast, slow)


def test_itm_loss_is_cross_entropy():
    logits = torch.randn(9, 2)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    expected = sum(-(logits[i, labels[i]] - torch.logsumexp(logits[i], 0)) for i in range(9)) / 9
    torch.testing.assert_close(losses.itm_loss(logits, labels), expected)


# ----------------------------------------------------------------------------- MLM masking

PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 1000


def token_batch(rows=4000, length=32, seed=0):
    """[CLS] words [SEP] [PAD]...; lengths vary from 3 to ``length`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(3, length + 1, (rows,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = CLS
        ids[i, n - 1] = SEP
        ids[i, n:] = PAD
    return ids


def test_mask_tokens_rates_and_special_tokens():
    ids = token_batch()
    masked, labels = losses.mask_tokens(ids, VOCAB, mask_token_id=MASK, pad_token_id=PAD,
                                        cls_token_id=CLS, generator=torch.Generator().manual_seed(0))
    selected = labels != IGNORE
    eligible = (ids != PAD) & (ids != CLS)
    n_eligible, n_selected = int(eligible.sum()), int(selected.sum())
    assert n_eligible > 50000
    # 15 % of the eligible tokens (binomial sd ~0.0015 here: tolerance ~4 sd)
    assert n_selected / n_eligible == pytest.approx(0.15, abs=0.006)
    # never CLS or PAD; SEP can be selected, at about the same rate
    assert not selected[ids == CLS].any() and not selected[ids == PAD].any()
    sep = ids == SEP
    assert selected[sep].float().mean().item() == pytest.approx(0.15, abs=0.02)
    # labels: the original token where selected, -100 elsewhere
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == IGNORE).all()
    # unselected tokens unchanged
    assert torch.equal(masked[~selected], ids[~selected])
    # 80 % [MASK], 10 % random, 10 % unchanged (a random draw hits [MASK] or the original
    # token with probability 1/VOCAB each: negligible against the tolerance)
    sel_masked, sel_orig = masked[selected], ids[selected]
    frac_mask = (sel_masked == MASK).float().mean().item()
    frac_same = (sel_masked == sel_orig).float().mean().item()
    frac_random = ((sel_masked != MASK) & (sel_masked != sel_orig)).float().mean().item()
    assert frac_mask == pytest.approx(0.8, abs=0.01)
    assert frac_same == pytest.approx(0.1, abs=0.01)
    assert frac_random == pytest.approx(0.1, abs=0.01)
    # random replacements are spread over the vocabulary, not one id
    assert sel_masked[(sel_masked != MASK) & (sel_masked != sel_orig)].unique().numel() > 300
    assert masked.max() < VOCAB and masked.min() >= 0


def test_mask_tokens_is_reproducible_from_the_generator():
    ids = token_batch(rows=16)
    kw = dict(mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS)
    a = losses.mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(3), **kw)
    b = losses.mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- MLM loss

def mlm_case(seed=0, batch=3, length=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g) * 2
    logits_m = torch.randn(batch, length, vocab, generator=g) * 2
    labels = torch.randint(vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.6] = IGNORE
    labels[0, 1] = 5  # at least one masked token
    return logits, logits_m, labels


def brute_force_mlm(logits, labels, logits_m=None, alpha=0.0, normalizer=None):
    """ALBEF_FACTS: (1 - alpha) * CE + alpha * mean of -sum(softmax(m) * log_softmax), over
    masked tokens. One token at a time, float64."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == IGNORE:
                continue
            row = [float(x) for x in logits[b, t]]
            log_z = math.log(sum(math.exp(x) for x in row))
            ce = -(row[int(labels[b, t])] - log_z)
            term = ce
            if logits_m is not None and alpha > 0:
                row_m = [float(x) for x in logits_m[b, t]]
                z_m = sum(math.exp(x) for x in row_m)
                distill = -sum(math.exp(xm) / z_m * (x - log_z) for x, xm in zip(row, row_m))
                term = (1 - alpha) * ce + alpha * distill
            total += term
            count += 1
    return total / (normalizer if normalizer is not None else count)


def test_mlm_loss_alpha_zero_is_cross_entropy():
    logits, logits_m, labels = mlm_case()
    expected = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE)
    torch.testing.assert_close(losses.mlm_loss(logits, labels), expected)
    # momentum logits are ignored at alpha 0
    torch.testing.assert_close(losses.mlm_loss(logits, labels, logits_m, 0.0), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_mlm_loss_with_distillation_equals_brute_force(alpha):
    logits, logits_m, labels = mlm_case(seed=1)
    got = losses.mlm_loss(logits, labels, logits_m, alpha)
    assert got.item() == pytest.approx(brute_force_mlm(logits, labels, logits_m, alpha), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_loss_on_masked_rows_only_equals_full_input(alpha):
    logits, logits_m, labels = mlm_case(seed=2)
    keep = labels != IGNORE
    full = losses.mlm_loss(logits, labels, logits_m, alpha)
    masked_only = losses.mlm_loss(logits[keep], labels[keep], logits_m[keep], alpha)
    torch.testing.assert_close(masked_only, full)


def test_mlm_loss_normalizer_replaces_the_token_count():
    logits, logits_m, labels = mlm_case(seed=3)
    count = int((labels != IGNORE).sum())
    for normalizer in (2.5, torch.tensor(7.0)):
        got = losses.mlm_loss(logits, labels, logits_m, 0.4, normalizer=normalizer)
        plain = losses.mlm_loss(logits, labels, logits_m, 0.4)
        torch.testing.assert_close(got, plain * count / float(normalizer))
        assert got.item() == pytest.approx(
            brute_force_mlm(logits, labels, logits_m, 0.4, float(normalizer)), rel=1e-5)


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
    logits, _, labels = mlm_case(seed=4)
    labels[:] = IGNORE
    loss = losses.mlm_loss(logits, labels)
    assert loss.item() == 0.0


def test_uniform_mix_of_itm_weights_is_the_stated_mixture_and_zero_mix_changes_nothing():
    sim, pos, ids = itm_case()
    hard = brute_force_weights(sim, pos, ids)
    valid = (hard > 0).double()  # brute force: every allowed candidate has exp(.) > 0
    uniform = valid / valid.sum(dim=1, keepdim=True)
    for p in (0.25, 0.5, 1.0):
        weights, _ = losses.itm_weights(sim, pos, ids, ids, uniform_mix=p)
        torch.testing.assert_close(weights.double(), (1 - p) * hard + p * uniform, rtol=1e-5, atol=1e-7)
        assert (weights[ids[:, None] == ids[None, :]] == 0).all()  # same-image pairs stay excluded
    assert torch.equal(losses.itm_weights(sim, pos, ids, ids, uniform_mix=0.0)[0], losses.itm_weights(sim, pos, ids, ids)[0])
    # the mixture gives every valid candidate at least p / #valid, however far its similarity
    far = sim.clone()
    far[:, 0] = -1e4
    w, _ = losses.itm_weights(far, pos, uniform_mix=0.5)
    n_valid = far.shape[1] - 1
    assert (w[1:, 0] >= 0.5 / n_valid - 1e-7).all()
    assert (losses.itm_weights(far, pos)[0][1:, 0] < 1e-30).all()
