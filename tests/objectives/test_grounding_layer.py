"""Which fusion layer grounding's Grad-CAM reads by default: the reference's (text layer 8 of
albef-base: its 3rd fusion layer of 6), and in a smaller model the last but one, never the
last when there is another: there only [CLS]'s row of the cross-attention reaches the ITM
score, shown here on a random model (zero gradient at every other row of the last layer,
not of the one before)."""
import types

import torch

from albef_ds.models.gradcam import saved_cross_attention
from albef_ds.objectives.grounding import GroundingObjective
from tests.support.layouts import randomise, small_cfg


def default_layer(text_depth, fusion_layer):
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(text_depth=text_depth, fusion_layer=fusion_layer))
    return GroundingObjective(small_cfg("grounding"), None).gradcam_layer(model)


def test_default_layer_is_the_references_or_the_last_but_one():
    assert default_layer(12, 6) == 8  # albef-base: the reference's block_num 8
    assert default_layer(11, 6) == 8  # 5 fusion layers: still the 3rd
    assert default_layer(10, 6) == 8  # 4: the 3rd is the last but one
    assert default_layer(4, 2) == 2  # the tiny preset: fusion layer 0 of 2
    assert default_layer(3, 2) == 2  # one fusion layer: the only one


def test_in_the_last_fusion_layer_only_the_cls_row_reaches_the_itm_score():
    cfg = small_cfg("grounding")  # text_depth 4, fusion_layer 2: fusion layers 2 and 3
    from albef_ds.models import ALBEF
    torch.manual_seed(0)
    model = ALBEF(cfg.model).double().eval()
    randomise(model, 2)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(5, cfg.model.vocab_size, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    rows = {}
    for layer in (2, 3):
        with saved_cross_attention(model.text_encoder.bert, layer) as attn:
            fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(images))
            (grads,) = torch.autograd.grad(model.itm_logits(fused, mask)[:, 1].sum(), attn.attention_map)
        rows[layer] = grads.abs().amax(dim=(0, 1, 3))  # per text row
    assert rows[3][0] > 0 and (rows[3][1:] == 0).all()  # the last: [CLS]'s row alone
    assert (rows[2][1:] > 0).all()  # the one before: every row
