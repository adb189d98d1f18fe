"""NLVR2's two-image fusion encoder (BertModel(cfg, images_per_text=2)).

The reference (ALBEF models/model_nlvr.py, Pretrain_nlvr.py) replicates each pretrained
fusion layer k into two consecutive blocks, the first attending to image 0, the second to
image 1, both initialised from layer k, their cross-attention key/value projections shared.
So the documented identity checked here: the two-image fusion of (image0, image1), built
from a single-image model by replicate_fusion_layers, equals running every pretrained
fusion layer k twice in a row, with image0 and then with image1 (with both images equal:
layer k twice on the same image). The brute force calls our single-image layers one by
one; those are checked against transformers in test_bert_vs_hf.py."""
import copy
import re

import pytest
import torch

from albef_ds.models.bert import BertForMaskedLM, BertModel, additive_mask, replicate_fusion_layers
from tests.support.hf import TOL, assert_close_tokens, batch, model_cfg, randomise


def pretrained_pair(sdpa=True):
    """(cfg, single-image model, two-image model loaded strictly from its replicated weights)."""
    cfg = model_cfg(sdpa=sdpa)  # 4 layers, fusion_layer 2
    single = BertForMaskedLM(cfg).eval()
    randomise(single, seed=11)
    two = BertForMaskedLM(cfg, images_per_text=2).eval()
    two.load_state_dict(replicate_fusion_layers(single.state_dict(), cfg.fusion_layer), strict=True)
    return cfg, single, two


def inputs(cfg, seed=12):
    ids, mask = batch(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(*ids.shape, cfg.text_width, generator=g)
    image0 = torch.randn(ids.shape[0], 5, cfg.vision_width, generator=g)
    image1 = torch.randn(ids.shape[0], 5, cfg.vision_width, generator=g)
    return text, mask, image0, image1


def each_layer_per_image(single, text, mask, images):
    """Brute force: pretrained fusion layer k with images[0], then again with images[1], ..."""
    ext = additive_mask(mask, text.dtype)
    hidden = text
    for layer in single.bert.fusion_layers:
        for image in images:
            hidden = layer(hidden, ext, image)
    return hidden


def test_layout_matches_the_reference_nlvr2_encoder():
    cfg = model_cfg()
    two = BertModel(cfg, images_per_text=2)
    n_fusion = cfg.text_depth - cfg.fusion_layer
    assert len(two.encoder.layer) == cfg.fusion_layer + 2 * n_fusion  # 18 for albef-base
    layers = {int(m[1]) for k in two.state_dict() if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    assert layers == set(range(cfg.fusion_layer + 2 * n_fusion))
    # Every block has its own key names (strict loading of the reference checkpoint), and
    # within a pair key/value are one parameter while queries and the rest are not.
    for j in range(n_fusion):
        a = two.encoder.layer[cfg.fusion_layer + 2 * j].crossattention.self
        b = two.encoder.layer[cfg.fusion_layer + 2 * j + 1].crossattention.self
        assert a.key.weight is b.key.weight and a.value.bias is b.value.bias
        assert a.query.weight is not b.query.weight
    later = two.encoder.layer[cfg.fusion_layer + 2].crossattention.self
    assert later.key.weight is not two.encoder.layer[cfg.fusion_layer].crossattention.self.key.weight
    assert f"encoder.layer.{cfg.fusion_layer + 1}.crossattention.self.key.weight" in two.state_dict()


def test_replicate_fusion_layers_maps_keys_as_the_reference():
    sd = {"text_encoder.bert.encoder.layer.1.attention.self.query.weight": torch.zeros(1),
          "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight": torch.ones(1),
          "text_encoder.bert.encoder.layer.3.output.dense.bias": torch.full((1,), 3.0),
          "text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(2),
          "visual_encoder.blocks.3.attn.qkv.weight": torch.zeros(3)}
    out = replicate_fusion_layers(sd, fusion_layer=2)
    assert sorted(out) == sorted([
        "text_encoder.bert.encoder.layer.1.attention.self.query.weight",
        "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
        "text_encoder.bert.encoder.layer.4.output.dense.bias",
        "text_encoder.bert.encoder.layer.5.output.dense.bias",
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "visual_encoder.blocks.3.attn.qkv.weight"])
    assert out["text_encoder.bert.encoder.layer.5.output.dense.bias"] is sd[
        "text_encoder.bert.encoder.layer.3.output.dense.bias"]


@pytest.mark.parametrize("sdpa", [True, False])
@torch.no_grad()
def test_two_image_fusion_is_each_pretrained_layer_once_per_image(sdpa):
    cfg, single, two = pretrained_pair(sdpa)
    text, mask, image0, image1 = inputs(cfg)
    got = two.bert.fuse(text, mask, [image0, image1])
    assert_close_tokens(got, each_layer_per_image(single, text, mask, [image0, image1]), mask)
    # Same through precomputed keys/values (each block's own image).
    kvs = two.bert.cross_kv([image0, image1])
    assert_close_tokens(two.bert.fuse(text, mask, image_kvs=kvs), got, mask)
    # The order matters: block 0 of a pair sees image 0.
    keep = mask.bool()
    assert not torch.allclose(two.bert.fuse(text, mask, [image1, image0])[keep], got[keep], **TOL)


@pytest.mark.parametrize("sdpa", [True, False])
@torch.no_grad()
def test_both_images_equal_is_each_pretrained_layer_twice(sdpa):
    cfg, single, two = pretrained_pair(sdpa)
    text, mask, image, _ = inputs(cfg)
    got = two.bert.fuse(text, mask, [image, image])
    assert_close_tokens(got, each_layer_per_image(single, text, mask, [image, image]), mask)
    # ... which is not the single-image fusion (each layer once).
    keep = mask.bool()
    assert not torch.allclose(got[keep], single.bert.fuse(text, mask, image)[keep], **TOL)


def test_image_count_is_checked():
    cfg, single, two = pretrained_pair()
    text, mask, image0, image1 = inputs(cfg)
    with pytest.raises(ValueError, match="2 image"):
        two.bert.fuse(text, mask, image0)
    with pytest.raises(ValueError, match="1 image"):
        single.bert.fuse(text, mask, [image0, image1])


def test_shared_key_value_stay_shared_through_training_and_copies():
    cfg, _, two = pretrained_pair()
    momentum = copy.deepcopy(two)  # how ALBEF builds its momentum encoders
    text, mask, image0, image1 = inputs(cfg)
    two.train()
    opt = torch.optim.SGD(two.parameters(), lr=0.1)
    two.bert.fuse(text, mask, [image0, image1]).square().mean().backward()
    opt.step()
    for model in (two, momentum):
        a = model.bert.encoder.layer[cfg.fusion_layer].crossattention.self
        b = model.bert.encoder.layer[cfg.fusion_layer + 1].crossattention.self
        assert a.key.weight is b.key.weight and a.value.weight is b.value.weight
    # Counted once by parameters(), as an optimizer must see it.
    n_fusion = cfg.text_depth - cfg.fusion_layer
    names = [n for n, _ in two.named_parameters() if "crossattention.self.key.weight" in n]
    assert len(names) == n_fusion
