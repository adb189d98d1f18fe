"""Two and four real ranks (gloo on CPU, started as a launcher starts them) against one process.

- 2 ranks x B give the gradients (after DeepSpeed's averaging) of 1 rank x 2B, with
  dropout 0, fixed ITM negatives and MLM masks, and the MLM loss normalised by the global
  count of masked tokens, including the gradient through gathered ITM negatives.
- The gradient of loss_itm alone through the gathered negatives (own-rank negatives and
  rows drawn by two ranks included) equals one rank's; mutated exchanges (remote rows
  detached, gradient x W or / W) miss it by orders of magnitude.
- Queues are bit-identical across ranks and hold exactly the gathered momentum features.
- Global negatives: drawn from the other rank's samples too, never a same-image pair, and
  the gradient reaches the other rank's image encoder.
- Retrieval evaluation split over 2 ranks gives exactly the numbers of 1 rank.
"""
from pathlib import Path

import pytest
import torch

from albef_ds.models import ALBEF
from albef_ds.objectives.pretrain import albef_forward

from tests.support.launch import albef_command, call
from tests.support.retrieval import fake_io, fake_split
from tests.support.tiny import GLOBAL_BATCH, fixed_inputs, tiny_cfg

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: fp32 sums in another order (gathers, all-reduce of gradients): relative tolerance.
GRAD_RTOL = 1e-4
#: Each tensor's error is taken relative to its own largest entry, but never to less than
#: this fraction of the largest entry of the whole gradient. Some exact gradients are zero
#: (an attention key bias: softmax over the keys ignores a constant added to every key
#: score), so both sides hold rounding noise (~1e-11) and noise over noise means nothing.
GRAD_FLOOR = 1e-3
#: A mutated ITM gradient (remote rows detached, x W, / W) must miss by this factor at least.
MUTATION_MARGIN = 100


#: world sizes of the real launches: every multi-rank assertion holds at each.
WORLDS = (2, 4)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """world size -> what each rank saw; one launch per world size serves every test."""
    out = {}
    for world in WORLDS:
        d = tmp_path_factory.mktemp(f"dist{world}")
        call(albef_command(world, ["--out", str(d)], module="tests.support.drivers.dist_driver"))
        out[world] = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return out


@pytest.fixture(params=WORLDS, ids=[f"{w}ranks" for w in WORLDS])
def ranks(request, launches):
    return launches[request.param]


def one_rank_backward(loss_key: str):
    """1 rank x 2B, same weights, inputs and fixed negatives, plain PyTorch (no DeepSpeed, no
    gather): the model, its outputs and the gradient of ``out[loss_key]``."""
    cfg = tiny_cfg(1)
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    x = fixed_inputs(cfg)
    out = model(albef_forward, x["images"], x["ids"], x["mask"], x["mlm_ids"], x["mlm_labels"], alpha=0.4,
                image_ids=x["image_ids"], itm_negatives=(x["neg_text"], x["neg_image"]))
    out[loss_key].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, out, grads


@pytest.fixture(scope="module")
def single():
    return one_rank_backward("loss")


def relative_errors(got: dict, ref: dict) -> dict:
    """name -> max |got - ref| / max(max |ref|, GRAD_FLOOR x the largest |ref| overall)."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    floor = GRAD_FLOOR * max(r.abs().max().item() for r in ref.values())
    return {n: (got[n] - r).abs().max().item() / max(r.abs().max().item(), floor) for n, r in ref.items()}


@pytest.fixture(scope="module")
def single_itm_grads():
    """The gradient of loss_itm alone (and the loss), 1 rank x 2B."""
    _, out, grads = one_rank_backward("loss_itm")
    return {"loss_itm": out["loss_itm"].detach(), **grads}


def test_two_ranks_give_the_gradients_of_one_rank_with_twice_the_batch(ranks, single):
    _, _, grads = single
    got = ranks[0]["grads"]
    assert torch.equal(ranks[0]["grads"]["visual_encoder.pos_embed"], ranks[1]["grads"]["visual_encoder.pos_embed"])
    for name, err in relative_errors(got, grads).items():
        assert err < GRAD_RTOL, f"{name}: relative error {err:.2e}"
    # The ITM gradient through gathered negative images is in there: the vision tower's
    # gradient must be non-trivial.
    assert got["visual_encoder.blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_itm_gradient_through_exchanged_negatives_equals_one_rank(ranks, single_itm_grads):
    """Selected-row exchange and full gather: the gradient and loss of one rank x 2B."""
    ref = {k: v for k, v in single_itm_grads.items() if k != "loss_itm"}
    for way in ("true", "full_gather"):
        for rank in ranks:
            got = {k: v for k, v in rank["itm_grads"][way].items() if k != "loss_itm"}
            errors = relative_errors(got, ref)
            worst = max(errors, key=errors.get)
            assert errors[worst] < GRAD_RTOL, f"{way}: {worst}: relative error {errors[worst]:.2e}"
        mean = sum(r["itm_grads"][way]["loss_itm"] for r in ranks) / len(ranks)
        torch.testing.assert_close(mean, single_itm_grads["loss_itm"], rtol=1e-5, atol=1e-6)
    # The negatives' path carries a real share of the image encoder's ITM gradient.
    assert single_itm_grads["visual_encoder.blocks.0.attn.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("mutation", ["detached_remote_rows", "grad_times_world", "grad_over_world"])
def test_a_wrong_negatives_gradient_fails_the_comparison(ranks, single_itm_grads, mutation):
    """Mutations of the exchange that the test above must catch, by a wide margin."""
    got = {k: v for k, v in ranks[0]["itm_grads"][mutation].items() if k != "loss_itm"}
    ref = {k: v for k, v in single_itm_grads.items() if k != "loss_itm"}
    worst = max(relative_errors(got, ref).values())
    assert worst > MUTATION_MARGIN * GRAD_RTOL, f"{mutation}: worst relative error only {worst:.2e}"


def test_losses_average_to_the_single_process_losses(ranks, single):
    _, out, _ = single
    for key in ("loss_itc", "loss_itm", "loss_mlm"):
        mean = sum(r["losses"][key] for r in ranks) / len(ranks)
        torch.testing.assert_close(mean, out[key].detach(), rtol=1e-5, atol=1e-6)


def test_queues_identical_across_ranks_and_hold_the_gathered_features(ranks, single):
    r0 = ranks[0]
    for r in ranks[1:]:
        assert torch.equal(r0["image_queue"], r["image_queue"])
        assert torch.equal(r0["text_queue"], r["text_queue"])
    assert int(r0["queue_ptr"]) == GLOBAL_BATCH
    # The first GLOBAL_BATCH columns are the momentum features of the global batch, in rank order.
    assert torch.equal(r0["image_queue"][:, :GLOBAL_BATCH], r0["image_feat_m_all"].t())
    model, _, _ = single
    torch.testing.assert_close(r0["image_queue"][:, :GLOBAL_BATCH], model.image_queue[:, :GLOBAL_BATCH],
                               rtol=1e-5, atol=1e-6)


def test_global_negatives_cross_ranks_and_skip_same_image(ranks):
    image_ids = fixed_inputs(tiny_cfg(1))["image_ids"]
    per = GLOBAL_BATCH // len(ranks)
    for rank, r in enumerate(ranks):
        rows = torch.arange(per) + rank * per
        for drawn in (r["sampled_neg_text"], r["sampled_neg_image"]):
            assert (drawn != rows).all(), "a positive was drawn as a negative"
            assert (image_ids[drawn] != image_ids[rows]).all(), "a same-image pair was drawn"
            other = (drawn // per) != rank
            assert other.any(), "no negative came from the other rank"
    assert ranks[1]["itm_only_visual_grad_norm"] > 0, \
        "rank 1's image encoder got no gradient through rank 0's negatives"


def test_retrieval_on_two_ranks_equals_one_rank(ranks):
    from albef_ds.eval.retrieval import evaluate
    cfg = tiny_cfg(1)
    torch.manual_seed(0)
    single = evaluate(ALBEF(cfg.model), fake_split(), *fake_io(cfg.model.image_res, cfg.model.vocab_size),
                      k_test=3, batch_size=2)
    for r in ranks:
        assert r["retrieval"] == single


def _bytes(traffic: dict) -> float:
    return sum(traffic.values())


def test_bytes_per_rank_constant_in_the_world_size_with_the_row_exchange(launches):
    """Same micro-batch, a pool of 2 ranks: bytes through our own collectives per rank per
    step do not grow from 2 to 4 ranks; the full gather over the world does (measured the
    same way); with the exchange, the negatives' own bytes are constant even over the world."""
    mean = {w: {k: sum(_bytes(r["traffic"][k]) for r in launches[w]) / w for k in launches[w][0]["traffic"]}
            for w in WORLDS}
    assert mean[2]["rows_pool2"] > 0
    assert abs(mean[4]["rows_pool2"] / mean[2]["rows_pool2"] - 1) < 0.10, mean
    assert mean[4]["gather_world"] / mean[2]["gather_world"] > 1.8, mean  # O(world): 3/1 ideally

    def negatives(r, key):
        t = r["traffic"][key]
        return sum(v for k, v in t.items() if k.startswith("negatives_"))
    rows = {w: sum(negatives(r, "rows_world") for r in launches[w]) / w for w in WORLDS}
    assert abs(rows[4] / rows[2] - 1) < 0.10, rows
    # A rank receives its B = 4 drawn rows, and the gradients of the 4 rows drawn of it.
    row_bytes = 17 * 32 * 4  # image tokens x width x fp32
    for r in launches[4]:
        t = r["traffic"]["rows_world"]
        assert t["negatives_exchange"] == 4 * row_bytes and t["negatives_exchange_backward"] == 4 * row_bytes
