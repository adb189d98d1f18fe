"""Float64 end to end: the pretraining forward against a brute-force float64 computation
written plainly here (no albef_ds.losses). (The draw order and the components' dtypes:
tests/models/test_numerics.py.)

The features come from the model's components (the encoders are checked against
transformers elsewhere); the losses are recomputed row by row: log-softmax as x -
logsumexp, each ITM pair fused on its own, MLM over full-vocabulary logits at every
position. A float32 detour anywhere (attention softmax, a loss's .float()) leaves errors
of ~1e-7, far above the 1e-10 asserted."""
import copy
import math

import torch

from tests.support.tiny import make_batch, make_model, small_config

from albef_ds.objectives.pretrain import albef_forward

ALPHA = 0.4
NEG_TEXT = torch.tensor([3, 2, 5, 0, 7, 6, 1, 4])
NEG_IMAGE = torch.tensor([1, 3, 0, 2, 5, 7, 4, 6])


def log_softmax(row):
    return row - torch.logsumexp(row, dim=0)


def softmax(row):
    e = torch.exp(row - row.max())
    return e / e.sum()


def brute_force_losses(model, batch, alpha):
    """ITC (+MoD, queue), ITM on the fixed negatives, MLM (+MoD): plain float64 loops."""
    b = batch["images"].shape[0]
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    labels, mlm_ids = batch["mlm_labels"], batch["mlm_ids"]
    temp = model.temp.detach()[0]
    with torch.no_grad():
        img_embeds = model.encode_image(images)
        txt_embeds = model.encode_text(ids, mask)
        img = model.image_feat(img_embeds)
        txt = model.text_feat(txt_embeds, mask)
        img_embeds_m = model.encode_image(images, momentum=True)
        img_m = model.image_feat(img_embeds_m, momentum=True)
        txt_m = model.text_feat(model.encode_text(ids, mask, momentum=True), mask, momentum=True)
        text_cands = torch.cat([txt_m, model.text_queue.t()])
        image_cands = torch.cat([img_m, model.image_queue.t()])
        itc = 0.0
        for i in range(b):
            for query, query_m, cands in ((img[i], img_m[i], text_cands), (txt[i], txt_m[i], image_cands)):
                sim = torch.stack([query @ c for c in cands]) / temp
                sim_m = torch.stack([query_m @ c for c in cands]) / temp
                onehot = torch.zeros_like(sim)
                onehot[i] = 1
                target = alpha * softmax(sim_m) + (1 - alpha) * onehot
                itc = itc - (log_softmax(sim) * target).sum() / (2 * b)
        itm = 0.0
        rows = ([(t, t, 1) for t in range(b)] + [(t, int(NEG_IMAGE[t]), 0) for t in range(b)]
                + [(int(NEG_TEXT[t]), t, 0) for t in range(b)])
        for text, image, label in rows:
            fused = model.fuse(txt_embeds[text:text + 1], mask[text:text + 1], img_embeds[image:image + 1])
            itm = itm - log_softmax(model.itm_logits(fused)[0])[label] / len(rows)
        logits = model.mlm_logits(mlm_ids, mask, img_embeds)                      # [B, L, V], every position
        logits_m = model.mlm_logits(mlm_ids, mask, img_embeds_m, momentum=True)
        masked = [(r, p) for r in range(b) for p in range(ids.shape[1]) if labels[r, p] != -100]
        mlm = 0.0
        for r, p in masked:
            lp = log_softmax(logits[r, p])
            ce = -lp[labels[r, p]]
            distill = -(softmax(logits_m[r, p]) * lp).sum()
            mlm = mlm + ((1 - alpha) * ce + alpha * distill) / len(masked)
    return {"loss_itc": itc, "loss_itm": itm, "loss_mlm": mlm}


def float64_model_and_batch():
    model = make_model(small_config()).double()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in make_batch(repeat_images=False).items()}
    return model, batch


def test_a_float64_forward_matches_a_float64_brute_force_to_1e_10():
    model, batch = float64_model_and_batch()
    assert model.image_queue.dtype == torch.float64 and model.temp.dtype == torch.float64
    expected = brute_force_losses(copy.deepcopy(model), batch, ALPHA)  # before the forward moves the queue
    out = model(albef_forward, **batch, alpha=ALPHA, itm_negatives=(NEG_TEXT, NEG_IMAGE))
    for key in ("loss_itc", "loss_itm", "loss_mlm"):
        assert out[key].dtype == torch.float64, key
        assert abs(out[key].item() - expected[key].item()) <= 1e-10, (key, out[key].item(), expected[key].item())
    assert math.isfinite(out["loss"].item())


def test_the_brute_force_check_has_teeth():
    """Mutation: the same forward on the float32 model is off by far more than 1e-10 (so the
    1e-10 above can only hold in float64 end to end), and a wrong alpha is caught."""
    model, batch = float64_model_and_batch()
    expected = brute_force_losses(copy.deepcopy(model), batch, ALPHA)
    model32 = copy.deepcopy(model).float()
    batch32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    out32 = model32(albef_forward, **batch32, alpha=ALPHA, itm_negatives=(NEG_TEXT, NEG_IMAGE))
    worst = max(abs(out32[k].item() - expected[k].item()) for k in expected)
    assert worst > 1e-8, worst
    wrong = brute_force_losses(copy.deepcopy(model), batch, ALPHA + 0.01)
    assert abs(wrong["loss_itc"].item() - expected["loss_itc"].item()) > 1e-6


def test_bf16_losses_still_compute_in_fp32():
    from albef_ds import losses
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 0, 1, 0, 0])
    bf16 = losses.itm_loss(logits.bfloat16(), labels)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - losses.itm_loss(logits.bfloat16().float(), labels).item()) == 0.0
    assert losses.itm_loss(logits.double(), labels).dtype == torch.float64
