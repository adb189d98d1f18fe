"""Tiny ALBEF models and fixed inputs for the model-level and multi-rank tests.

``small_config`` / ``make_model`` / ``make_batch`` / ``forward_backward``: one process, 8
pairs, fixed ITM negatives (tests/models, tests/objectives, tests/train). ``tiny_cfg`` /
``fixed_inputs``: one global batch split over ranks (tests/support/drivers/dist_driver.py
against one process in tests/train/test_distributed.py).
"""
import dataclasses

import pytest
import torch

from albef_ds import losses
from albef_ds.config import load_config
from albef_ds.losses import mask_tokens
from albef_ds.models import ALBEF
from albef_ds.objectives.pretrain import albef_forward

PAD, CLS, SEP, MASK = 0, 2, 3, 4
VOCAB = 100
BATCH, LENGTH = 8, 12
#: image of each pair: pairs 0/4 and 1/7 show the same image.
IMAGE_IDS = [10, 11, 12, 13, 10, 14, 15, 11]
#: fixed ITM negatives (never the positive, never the same image): text for each image,
#: image for each text.
NEG_TEXT = torch.tensor([(i + 1) % BATCH for i in range(BATCH)])
NEG_IMAGE = torch.tensor([(i + 3) % BATCH for i in range(BATCH)])


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread buys nothing, and when the 2 CPU
    cores are shared with other jobs OpenMP's spinning threads make steps 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(*overrides: str):
    """The tiny preset shrunk further for speed; dropout 0 so that runs are comparable."""
    return load_config("tiny", [
        "model.image_res=32", "model.patch_size=8", "model.vision_width=32", "model.vision_depth=2",
        "model.vision_heads=2", "model.text_width=32", "model.text_depth=4", "model.fusion_layer=2",
        "model.text_heads=2", "model.text_intermediate=64", f"model.vocab_size={VOCAB}",
        "model.max_position_embeddings=32", "model.embed_dim=16", "model.queue_size=32",
        "model.hidden_dropout=0.0", "model.attention_dropout=0.0", f"train.micro_batch_size={BATCH}",
        *overrides])


def make_model(cfg, seed=0) -> ALBEF:
    torch.manual_seed(seed)
    return ALBEF(cfg.model)


def twin(model: ALBEF, **changes) -> ALBEF:
    """A second model built with some config fields changed, carrying the same weights,
    queues and pointer."""
    other = ALBEF(dataclasses.replace(model.cfg, **changes))
    other.load_state_dict(model.state_dict())
    return other


def stir(model: ALBEF, seed=0) -> ALBEF:
    """Make results sensitive to what the tests compare: at BERT's init (std 0.02) the fused
    text barely depends on the image, so large random cross-attention weights make the
    image matter; momentum weights are moved off the online ones so mixing the two fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "crossattention" in name and p.dim() == 2 and p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, _, p_m in model.momentum_named_params():
            scale = 0.3 if "crossattention" in name and p_m.dim() == 2 else 0.02
            p_m.add_(scale * torch.randn(p_m.shape, generator=g))
    return model


def make_batch(res=32, seed=0, mlm_probability=0.3, repeat_images=True):
    """8 synthetic pairs; with ``repeat_images`` pairs 0/4 and 1/7 show the same image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=g)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    for i in range(BATCH):
        n = 5 + i % 7  # tokens incl. CLS and SEP, then padding
        ids[i, 0], ids[i, n - 1] = CLS, SEP
        ids[i, n:] = PAD
        mask[i, n:] = 0
    mlm_ids, mlm_labels = losses.mask_tokens(ids, VOCAB, mask_token_id=MASK, pad_token_id=PAD,
                                             cls_token_id=CLS, probability=mlm_probability, generator=g)
    assert (mlm_labels != losses.IGNORE_INDEX).sum() >= 4
    images = torch.randn(BATCH, 3, res, res, generator=g)
    image_ids = torch.arange(BATCH)
    if repeat_images:
        image_ids = torch.tensor(IMAGE_IDS)
        images[4], images[7] = images[0], images[1]
    return dict(images=images, text_ids=ids, text_mask=mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels,
                image_ids=image_ids)


def forward_backward(model, batch, alpha=0.4, negatives=(NEG_TEXT, NEG_IMAGE), backward=True):
    """One forward (+ backward) from a zero gradient; returns (outputs, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(albef_forward, **batch, alpha=alpha, itm_negatives=negatives)
    grads = {}
    if backward:
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_results(a, b, rtol=1e-5, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=rtol, atol=atol, msg=key)
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) > 50
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------- one batch over ranks

#: the multi-rank tests' global batch (tests/support/drivers/dist_driver.py)
GLOBAL_BATCH = 8


def tiny_overrides(world_size: int = 1) -> list[str]:
    per = GLOBAL_BATCH // world_size
    return [
        "model.image_res=32", "model.patch_size=8", "model.vision_width=32", "model.vision_depth=2",
        "model.vision_heads=2", "model.text_width=32", "model.text_depth=4", "model.fusion_layer=2",
        "model.text_heads=2", "model.text_intermediate=64", f"model.vocab_size={VOCAB}",
        "model.embed_dim=16", "model.queue_size=64", "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0", f"train.micro_batch_size={per}", "train.precision=fp32",
        "distributed.ds_config=ds_configs/zero2_fp32.json",
    ]


def tiny_cfg(world_size: int = 1, extra: list[str] = ()):
    return load_config("tiny", tiny_overrides(world_size) + list(extra), world_size=world_size)


def fixed_inputs(cfg, seed: int = 0) -> dict:
    """A global batch; image ids repeat across the two halves (same image on both ranks)."""
    g = torch.Generator().manual_seed(seed)
    b, length, res = GLOBAL_BATCH, 12, cfg.model.image_res
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):
        cut = 6 + i % 5
        ids[i, cut:] = 0
        mask[i, cut:] = 0
    mlm_ids, mlm_labels = mask_tokens(ids, VOCAB, mask_token_id=4, pad_token_id=0, cls_token_id=2,
                                      probability=0.3, generator=g)
    image_ids = torch.tensor([10, 11, 12, 13, 10, 21, 22, 23])  # sample 4 shows sample 0's image
    images = torch.randn(b, 3, res, res, generator=g)
    images[4] = images[0]
    # Fixed ITM negatives as global indices: never the positive, never a same-image pair.
    # Meant for 2 ranks (4 rows each) and 4 ranks (2 rows each): a negative image of the
    # row's own rank (rows 2 and 6 at 2 ranks, row 6 at 4), image 7 drawn by two ranks
    # (rows 1 and 6) and images drawn twice (2 by rows 4 and 7, 6 by rows 0 and 3).
    neg_text = torch.tensor([5, 6, 7, 5, 1, 2, 3, 1])
    neg_image = torch.tensor([6, 7, 1, 6, 2, 3, 7, 2])
    return dict(images=images, ids=ids, mask=mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels,
                image_ids=image_ids, neg_text=neg_text, neg_image=neg_image)
