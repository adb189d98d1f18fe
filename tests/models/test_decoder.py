"""The VQA answer decoder (albef_ds/models/decoder.py) and the causal self-attention it
runs on: against transformers' causal ``BertLayer`` / ``BertLMHeadModel`` on the same
weights (eager attention, masks built by transformers itself), causality, the reference's
parameter names, the initialisation from the fusion layers, and the per-answer loss
against a plain brute force."""
import math

import pytest
import torch

from albef_ds.models.bert import BertForMaskedLM, BertLayer
from albef_ds.models.decoder import BertLMHeadDecoder, answer_nll

from tests.support.hf import TOL, assert_close_tokens, batch, hf_config, model_cfg, randomise

transformers = pytest.importorskip("transformers")
from transformers.models.bert import modeling_bert as hf_bert  # noqa: E402


def question_states(cfg, b, seed=7, length=9):
    """Fusion-encoder output over padded questions: [B, Ls, W] and its 1/0 mask."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, length, cfg.text_width, generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    return states, mask


def hf_masks(hf_model, mask, encoder_mask):
    """transformers' own extended masks: causal x padding, and the inverted encoder mask."""
    ext = hf_model.get_extended_attention_mask(mask, mask.shape, dtype=torch.float32)
    return ext, hf_model.invert_attention_mask(encoder_mask)


def decoder_pair(sdpa=True, seed=1):
    """(ours, transformers BertLMHeadModel) with the same random weights."""
    cfg = model_cfg(sdpa=sdpa)
    c = hf_config(cfg, is_decoder=True, add_cross_attention=True)
    c.num_hidden_layers = 3
    hf = hf_bert.BertLMHeadModel(c).eval()
    randomise(hf, seed=seed)
    ours = BertLMHeadDecoder(cfg, num_layers=3).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert missing == ["bert.embeddings.position_ids"] and unexpected == []  # a buffer, not a weight
    return cfg, ours, hf


@pytest.mark.parametrize("sdpa", [True, False])
@torch.no_grad()
def test_causal_layer_equals_transformers_decoder_layer(sdpa):
    cfg = model_cfg(sdpa=sdpa)
    c = hf_config(cfg, is_decoder=True, add_cross_attention=True)
    theirs = hf_bert.BertLayer(c).eval()
    randomise(theirs, seed=2)
    ours = BertLayer(cfg, cross=True, causal=True, cross_width=cfg.text_width).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.attention.self.causal and not ours.crossattention.self.causal

    ids, mask = batch(cfg.vocab_size)
    hidden = torch.randn(*ids.shape, cfg.text_width, generator=torch.Generator().manual_seed(3))
    enc, enc_mask = question_states(cfg, ids.shape[0])
    ext, enc_ext = hf_masks(hf_bert.BertModel(c), mask, enc_mask)
    assert ext.shape == (3, 1, 12, 12)  # causal: one row per query
    want = theirs(hidden, attention_mask=ext, encoder_hidden_states=enc,
                  encoder_attention_mask=enc_ext)[0]
    pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    enc_pad = (1.0 - enc_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    got = ours(hidden, pad, enc, None, enc_pad)
    assert_close_tokens(got, want, mask)
    # Neither mask is a no-op: without the causal part or the question mask, it differs.
    ours.attention.self.causal = False
    assert not torch.allclose(ours(hidden, pad, enc, None, enc_pad)[mask.bool()], want[mask.bool()], **TOL)
    ours.attention.self.causal = True
    assert not torch.allclose(ours(hidden, pad, enc, None, None)[mask.bool()], want[mask.bool()], **TOL)


@pytest.mark.parametrize("sdpa", [True, False])
@torch.no_grad()
def test_decoder_equals_transformers_lm_head_model(sdpa):
    cfg, ours, hf = decoder_pair(sdpa)
    ids, mask = batch(cfg.vocab_size)
    enc, enc_mask = question_states(cfg, ids.shape[0])
    want = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
              encoder_attention_mask=enc_mask).logits
    got = ours(ids, mask, enc, enc_mask)
    assert_close_tokens(got, want, mask)
    # The LM head is tied to the decoder's own word embeddings.
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("sdpa", [True, False])
@torch.no_grad()
def test_output_at_t_ignores_later_tokens(sdpa):
    cfg, ours, _ = decoder_pair(sdpa)
    ids, _ = batch(cfg.vocab_size)
    mask = torch.ones_like(ids)
    enc, enc_mask = question_states(cfg, ids.shape[0])
    base = ours(ids, mask, enc, enc_mask)
    for t in (0, 4, 10):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(5, cfg.vocab_size, changed[:, t + 1:].shape,
                                           generator=torch.Generator().manual_seed(t))
        out = ours(changed, mask, enc, enc_mask)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)


def test_parameter_names_are_the_reference_decoders():
    cfg = model_cfg()
    keys = set(BertLMHeadDecoder(cfg, num_layers=2).state_dict())
    layer = {"attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "crossattention.self.query", "crossattention.self.key",
             "crossattention.self.value", "crossattention.output.dense", "intermediate.dense",
             "output.dense"}
    want = {"bert.embeddings.position_ids", "cls.predictions.bias"}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        want.add(f"bert.embeddings.{name}.weight")
    for p in ("weight", "bias"):
        want |= {f"bert.embeddings.LayerNorm.{p}", f"cls.predictions.transform.dense.{p}",
                 f"cls.predictions.transform.LayerNorm.{p}", f"cls.predictions.decoder.{p}"}
        for i in range(2):
            want |= {f"bert.encoder.layer.{i}.{m}.{p}" for m in layer}
            want |= {f"bert.encoder.layer.{i}.{m}.LayerNorm.{p}"
                     for m in ("attention.output", "crossattention.output", "output")}
    assert keys == want


@torch.no_grad()
def test_init_from_encoder_copies_embeddings_fusion_layers_and_head():
    cfg = model_cfg()  # 4 layers, fusion_layer 2: two fusion layers
    encoder = BertForMaskedLM(cfg)
    randomise(encoder, seed=5)
    decoder = BertLMHeadDecoder(cfg, num_layers=2)
    decoder.init_from_encoder(encoder)
    theirs = encoder.state_dict()
    for key, value in decoder.state_dict().items():
        if key.startswith("bert.encoder.layer."):
            i = int(key.split(".")[3])
            source = key.replace(f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{cfg.fusion_layer + i}.")
        else:
            source = key
        torch.testing.assert_close(value, theirs[source], rtol=0, atol=0)
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="fusion layers"):
        BertLMHeadDecoder(cfg, num_layers=3).init_from_encoder(encoder)


def test_answer_nll_is_the_summed_shifted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    b, length, vocab = 3, 5, 11
    logits = torch.randn(b, length, vocab, generator=g, dtype=torch.float64)
    ids = torch.randint(1, vocab, (b, length), generator=g)
    labels = ids.clone()
    labels[1, 3:] = -100
    labels[2, 2:] = -100
    soft = torch.randn(b, length - 1, vocab, generator=g, dtype=torch.float64).softmax(-1)
    for smoothing in (0.0, 0.1):
        for alpha in (0.0, 0.4):
            want = torch.zeros(b, dtype=torch.float64)
            for i in range(b):
                for t in range(length - 1):
                    y = labels[i, t + 1].item()
                    if y == -100:
                        continue
                    row = logits[i, t]
                    logp = row - torch.logsumexp(row, 0)
                    ce = -(1 - smoothing) * logp[y] - smoothing * logp.mean()
                    distill = -(soft[i, t] * logp).sum()
                    want[i] += (1 - alpha) * ce + alpha * distill
            got = answer_nll(logits, labels, label_smoothing=smoothing,
                             soft_targets=soft if alpha else None, alpha=alpha)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # A one-token answer (start token + one) is -log p(that token | start).
    one = answer_nll(logits[:1, :2], labels[:1, :2])
    assert math.isclose(one.item(), -(logits[0, 0].log_softmax(0)[labels[0, 1]]).item(), rel_tol=1e-12)
