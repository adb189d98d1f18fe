"""Our BERT (albef_ds/models/bert.py) against Hugging Face transformers' BERT on the same
weights, copied through albef_ds.weights.load_hf_bert from a saved HF folder: the text
encoder, the fusion (cross-attention) layers, the MLM head; random and real weights."""

import pytest
import torch

from albef_ds.models import ALBEF
from albef_ds.weights import load_hf_bert

transformers = pytest.importorskip("transformers")

from tests.support.hf import (TOL, assert_close_tokens, batch, cross_layers_from, extended_mask,  # noqa: E402
                              hf_config, hf_layer_out, model_cfg, randomise)


@pytest.fixture(scope="module")
def random_bert(tmp_path_factory):
    """(folder, cfg): a saved transformers BertForMaskedLM with random weights."""
    cfg = model_cfg()
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(hf_config(cfg))
    randomise(hf, seed=1)
    folder = tmp_path_factory.mktemp("random_bert")
    hf.save_pretrained(folder)
    return folder, cfg


def loaded(folder, cfg):
    torch.manual_seed(3)
    model = ALBEF(cfg).eval()
    randomise(model.text_encoder.bert.encoder, seed=4)  # cross-attention random too
    report = load_hf_bert(model, folder)
    return model, report


@torch.no_grad()
def test_text_encoder_equals_transformers_bertmodel(random_bert):
    folder, cfg = random_bert
    model, _ = loaded(folder, cfg)
    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False).eval()
    hf.encoder.layer = hf.encoder.layer[: cfg.fusion_layer]
    ids, mask = batch(cfg.vocab_size)
    want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model.encode_text(ids, mask)
    assert_close_tokens(got, want, mask)
    assert_close_tokens(model.encode_text(ids, mask, momentum=True), want, mask)
    # Not trivially equal: the padding matters and the layers do something.
    assert not torch.allclose(got, hf(input_ids=ids).last_hidden_state, **TOL)


@torch.no_grad()
def test_fusion_layers_equal_transformers_cross_attention_layers(random_bert):
    folder, cfg = random_bert
    model, report = loaded(folder, cfg)
    assert any(".crossattention." in k for k in report.freshly_initialised)
    ids, mask = batch(cfg.vocab_size)
    g = torch.Generator().manual_seed(5)
    text = torch.randn(ids.shape[0], ids.shape[1], cfg.text_width, generator=g)
    image = torch.randn(ids.shape[0], 5, cfg.vision_width, generator=g)
    want, ext = text, extended_mask(mask)
    for layer in cross_layers_from(model, cfg):
        want = hf_layer_out(layer, want, ext, image)
    assert_close_tokens(model.fuse(text, mask, image), want, mask)
    # The shared-K/V path gives the same.
    assert_close_tokens(model.fuse(text, mask, image_kvs=model.cross_kv(image)), want, mask)


@torch.no_grad()
def test_mlm_head_equals_transformers_bertformaskedlm(random_bert):
    folder, cfg = random_bert
    model, _ = loaded(folder, cfg)
    hf = transformers.BertForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
    hf.bert.encoder.layer = hf.bert.encoder.layer[: cfg.fusion_layer]
    ids, mask = batch(cfg.vocab_size)
    want = hf(input_ids=ids, attention_mask=mask).logits
    hidden = model.encode_text(ids, mask)
    got = model.text_encoder.mlm_logits(hidden, masked_only=False)
    assert_close_tokens(got, want, mask)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5], labels[2, 1] = 7, 8, 9
    torch.testing.assert_close(model.text_encoder.mlm_logits(hidden, labels, masked_only=True),
                               want[labels != -100], **TOL)


@torch.no_grad()
def test_sdpa_and_eager_attention_agree(random_bert):
    folder, cfg = random_bert
    fast, _ = loaded(folder, cfg)
    eager = ALBEF(model_cfg(sdpa=False)).eval()
    eager.load_state_dict(fast.state_dict())
    assert fast.text_encoder.bert.encoder.layer[0].attention.self.sdpa
    assert not eager.text_encoder.bert.encoder.layer[0].attention.self.sdpa
    ids, mask = batch(cfg.vocab_size)
    image = torch.randn(ids.shape[0], 5, cfg.vision_width, generator=torch.Generator().manual_seed(6))
    for m in (fast, eager):
        m.outs = (m.encode_text(ids, mask), m.fuse(m.encode_text(ids, mask), mask, image),
                  m.mlm_logits(ids, mask, image))
    for a, b in zip(fast.outs, eager.outs):
        assert_close_tokens(a, b, mask)


# --------------------------------------------------------------------------- real weights

@torch.no_grad()
def test_real_pretrained_bert_text_and_fusion_layers_equal_transformers(minilm):
    # all-MiniLM-L6-v2: 6 layers of width 384, 12 heads: 3 text + 3 fusion layers here.
    cfg = model_cfg(width=384, depth=6, fusion=3, heads=12, intermediate=1536, vocab=30522)
    torch.manual_seed(0)
    model = ALBEF(cfg).eval()
    report = load_hf_bert(model, minilm)
    assert not report.missing and not report.unexpected
    assert any(k.startswith("text_encoder.bert.encoder.layer.5.crossattention.") for k in report.freshly_initialised)
    assert any(k.startswith("text_encoder.cls.predictions.") for k in report.freshly_initialised)  # no MLM head
    assert any(i.startswith("pooler.") for i in report.ignored)

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
    enc = tok(["a dog runs on the beach", "two red cubes left of a small blue sphere", "hello"],
              padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids[0, 0].item() == tok.cls_token_id and (mask == 0).any()

    hf = transformers.BertModel.from_pretrained(str(minilm), attn_implementation="eager").eval()
    full = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    hf.encoder.layer = hf.encoder.layer[:3]
    want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model.encode_text(ids, mask)
    assert_close_tokens(got, want, mask)
    eager = ALBEF(model_cfg(width=384, depth=6, fusion=3, heads=12, intermediate=1536, vocab=30522,
                            sdpa=False)).eval()
    eager.load_state_dict(model.state_dict())
    assert_close_tokens(eager.encode_text(ids, mask), want, mask)

    # Fusion layers: real self-attention/MLP weights, fresh cross-attention.
    image = torch.randn(ids.shape[0], 5, 384, generator=torch.Generator().manual_seed(1))
    ref, ext = want, extended_mask(mask)
    for layer in cross_layers_from(model, cfg):
        ref = hf_layer_out(layer, ref, ext, image)
    fused = model.fuse(got, mask, image)
    assert_close_tokens(fused, ref, mask)
    assert_close_tokens(eager.fuse(got, mask, image), ref, mask)
    # The cross-attention changes the result (it is not silently skipped).
    assert not torch.allclose(fused, full, atol=1e-3)
