"""Weight loading and export (albef_ds/weights.py) against independent references: the
reference key list, a plainly written bicubic resampling, and fresh models' outputs."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef_ds import weights
from albef_ds.config import load_config
from albef_ds.losses import mask_tokens
from albef_ds.models import ALBEF

KEYS_FILE = Path(__file__).parent / "fixtures" / "albef_pretrain_keys.txt"


def reference_layout() -> list[tuple[str, tuple]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split()
        rows.append((name, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return rows


def tiny_model_cfg(**overrides):
    cfg = load_config("tiny", [
        "model.image_res=32", "model.patch_size=8", "model.vision_width=32", "model.vision_depth=2",
        "model.vision_heads=2", "model.text_width=32", "model.text_depth=4", "model.fusion_layer=2",
        "model.text_heads=2", "model.text_intermediate=64", "model.vocab_size=100",
        "model.embed_dim=16", "model.queue_size=64", "train.micro_batch_size=4"]
        + [f"model.{k}={v}" for k, v in overrides.items()])
    return cfg.model


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (4, 10), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    masked, labels = mask_tokens(ids, cfg.vocab_size, 4, 0, 2, 0.3, generator=g)
    images = torch.randn(4, 3, cfg.image_res, cfg.image_res, generator=g)
    return images, ids, mask, masked, labels


@torch.no_grad()
def outputs(model, cfg, seed=0) -> dict:
    model.eval()
    images, ids, mask, masked, labels = inputs(cfg, seed)
    out = {}
    for mom in (False, True):
        s = "_m" if mom else ""
        img = model.encode_image(images, momentum=mom)
        txt = model.encode_text(ids, mask, momentum=mom)
        fused = model.fuse(txt, mask, img, momentum=mom)
        out.update({f"image{s}": img, f"text{s}": txt, f"fused{s}": fused,
                    f"image_feat{s}": model.image_feat(img, momentum=mom),
                    f"text_feat{s}": model.text_feat(txt, mask, momentum=mom),
                    f"mlm{s}": model.mlm_logits(masked, mask, img, momentum=mom)})
    out["itm"] = model.itm_logits(out["fused"])
    out["temp"] = model.temp.clone()
    for name in ("image_queue", "text_queue", "queue_ptr"):
        out[name] = getattr(model, name).clone()
    return out


def assert_same_outputs(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"output {k} differs")


# ------------------------------------------------------------------------------- layout

def test_export_equals_reference_layout_key_for_key():
    cfg = load_config("configs/albef-base.yaml").model
    with torch.device("meta"):
        model = ALBEF(cfg)
    exported = weights.export_albef_state_dict(model)
    got = [(k, tuple(v.shape)) for k, v in exported.items()]
    want = reference_layout()
    assert len(want) == 844
    assert sorted(got) == sorted(want)
    assert exported["temp"].dim() == 0  # the release's 0-d scalar


def test_export_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    src = ALBEF(cfg)
    with torch.no_grad():  # make momentum differ from online so a swap would show
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
        src.queue_ptr.fill_(8)
    path = tmp_path / "albef.pth"
    weights.save_albef_pth(src, path)
    ckpt = torch.load(path, weights_only=True)
    assert list(ckpt) == ["model"]

    torch.manual_seed(1)
    dst = ALBEF(cfg)
    before = outputs(dst, cfg)
    report = weights.load_albef_checkpoint(dst, path)
    assert not report.missing and not report.unexpected and not report.freshly_initialised
    after = outputs(dst, cfg)
    assert not torch.equal(before["mlm"], after["mlm"])
    assert_same_outputs(after, outputs(src, cfg))
    # The bare state dict loads too.
    torch.manual_seed(2)
    dst2 = ALBEF(cfg)
    weights.load_albef_checkpoint(dst2, weights.export_albef_state_dict(src))
    assert_same_outputs(outputs(dst2, cfg), outputs(src, cfg))


def test_missing_and_unexpected_keys_are_named():
    cfg = tiny_model_cfg()
    model = ALBEF(cfg)
    sd = weights.export_albef_state_dict(model)
    gone = "text_encoder.bert.encoder.layer.3.crossattention.self.value.weight"
    del sd[gone]
    sd["text_encoder.bert.encoder.layer.9.output.dense.weight"] = torch.zeros(3)
    with pytest.raises(weights.WeightLoadError) as e:
        weights.load_albef_checkpoint(ALBEF(cfg), {"model": sd})
    assert gone in str(e.value)
    assert "text_encoder.bert.encoder.layer.9.output.dense.weight" in str(e.value)
    report = weights.load_albef_checkpoint(ALBEF(cfg), sd, strict=False)
    assert report.missing == [gone]
    assert report.unexpected == ["text_encoder.bert.encoder.layer.9.output.dense.weight"]
    assert gone in str(report)


def test_shape_mismatch_names_key_and_both_shapes():
    model = ALBEF(tiny_model_cfg())
    sd = weights.export_albef_state_dict(ALBEF(tiny_model_cfg(embed_dim=8)))
    with pytest.raises(weights.WeightLoadError, match=r"vision_proj\.weight: source 8x32 vs model 16x32"):
        weights.load_albef_checkpoint(model, sd)


def test_queue_of_another_length_keeps_newest_entries_in_write_order():
    src = ALBEF(tiny_model_cfg(queue_size=128))
    with torch.no_grad():
        src.image_queue.copy_(torch.arange(128.0).expand(16, 128))  # column j written j-th...
        src.image_queue.copy_(torch.roll(src.image_queue, 40, dims=1))  # ...pointer at 40
        src.queue_ptr.fill_(40)
    dst = ALBEF(tiny_model_cfg(queue_size=64))
    with pytest.warns(UserWarning, match="queue"):
        report = weights.load_albef_checkpoint(dst, weights.export_albef_state_dict(src))
    assert any("image_queue: 128 entries -> 64" in n for n in report.notes)
    # Written order 0..127 (oldest at the pointer): the newest 64 are 64..127, oldest first.
    assert torch.equal(dst.image_queue[0], torch.arange(64.0, 128.0))
    assert int(dst.queue_ptr) == 0


def test_an_empty_source_queue_leaves_ours_as_it_is_with_a_note():
    """The demo trains with model.queue_size 0; fine-tuning its output with the preset's
    queue used to divide by zero in _fit_queue."""
    import warnings
    src = ALBEF(tiny_model_cfg(queue_size=0))
    dst = ALBEF(tiny_model_cfg(queue_size=64))
    before = dst.image_queue.clone(), dst.text_queue.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a warning: nothing was cut
        report = weights.load_albef_checkpoint(dst, weights.export_albef_state_dict(src))
    assert any("image_queue: the source has no queue" in n and "kept as it is" in n for n in report.notes)
    assert torch.equal(dst.image_queue, before[0]) and torch.equal(dst.text_queue, before[1])
    assert int(dst.queue_ptr) == 0
    # the other weights did load
    assert torch.equal(dst.vision_proj.weight, src.vision_proj.weight)


# ---------------------------------------------------------------------------- ViT

def plain_bicubic(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1)], dim=1)


def test_vit_224_state_dict_loads_at_256_with_bicubic_pos_embed():
    # A DeiT-style checkpoint at 224 px (14x14 patches), heads included as DeiT ships them.
    cfg224 = tiny_model_cfg(image_res=224, patch_size=16)
    cfg256 = tiny_model_cfg(image_res=256, patch_size=16)
    torch.manual_seed(0)
    vit224 = ALBEF(cfg224).visual_encoder
    sd = {k: v + 0.1 * torch.randn_like(v) for k, v in vit224.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 32), torch.randn(1000)
    assert sd["pos_embed"].shape == (1, 197, 32)

    model = ALBEF(cfg256)
    report = weights.load_vit_state_dict(model, {"model": sd})
    want = plain_bicubic(sd["pos_embed"], 16)
    assert model.visual_encoder.pos_embed.shape == (1, 257, 32)
    torch.testing.assert_close(model.visual_encoder.pos_embed.data, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.visual_encoder_m.pos_embed.data, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.visual_encoder.pos_embed.data[:, 0], sd["pos_embed"][:, 0])  # CLS kept
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert report.resampled and "1x197x32 -> 1x257x32" in report.resampled[0]
    assert any(i.startswith("head.weight") for i in report.ignored)


def test_albef_checkpoint_at_256_loads_at_384_with_resampled_pos_embed():
    src = ALBEF(tiny_model_cfg(image_res=256, patch_size=16))
    dst = ALBEF(tiny_model_cfg(image_res=384, patch_size=16))
    sd = weights.export_albef_state_dict(src)
    report = weights.load_albef_checkpoint(dst, sd)
    assert len(report.resampled) == 2  # online and momentum
    for part in ("visual_encoder", "visual_encoder_m"):
        torch.testing.assert_close(getattr(dst, part).pos_embed.data, plain_bicubic(sd[f"{part}.pos_embed"], 24),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- retrieval layout

def test_retrieval_layout_round_trip():
    cfg = tiny_model_cfg(itc_id_positives=True)
    torch.manual_seed(0)
    src = ALBEF(cfg)
    with torch.no_grad():
        src.idx_queue.copy_(torch.arange(64)[None])
    sd = weights.export_albef_state_dict(src, layout="retrieval")
    # The fine-tuned retrieval layout: plain BertModel text encoder, no MLM head, idx_queue.
    assert "text_encoder.encoder.layer.0.attention.self.query.weight" in sd
    assert "text_encoder_m.embeddings.word_embeddings.weight" in sd
    assert not any(".bert." in k or ".cls." in k for k in sd)
    assert "idx_queue" in sd

    torch.manual_seed(1)
    dst = ALBEF(cfg)
    head_before = dst.text_encoder.cls.predictions.transform.dense.weight.clone()
    report = weights.load_albef_checkpoint(dst, {"model": sd})
    assert any("text_encoder.cls.predictions.transform.dense.weight" == k for k in report.freshly_initialised)
    assert any(k.startswith("text_encoder_m.cls.") for k in report.freshly_initialised)
    assert torch.equal(dst.text_encoder.cls.predictions.transform.dense.weight, head_before)  # left as is
    assert torch.equal(dst.idx_queue, src.idx_queue)
    a, b = outputs(src, cfg), outputs(dst, cfg)
    for k in a:
        if not k.startswith("mlm"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # Into a pretraining model (no idx_queue): ignored, reported.
    plain = ALBEF(tiny_model_cfg())
    report = weights.load_albef_checkpoint(plain, sd)
    assert any(i.startswith("idx_queue") for i in report.ignored)


# ----------------------------------------------------------------------------- HF BERT

def test_hf_bert_load_reports_fresh_cross_attention(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=512)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(hf_cfg)
    hf.save_pretrained(tmp_path)
    model = ALBEF(tiny_model_cfg(max_position_embeddings=512))
    report = weights.load_hf_bert(model, tmp_path)
    fresh = set(report.freshly_initialised)
    for layer in (2, 3):
        for name in ("self.query.weight", "self.key.weight", "self.value.bias", "output.LayerNorm.weight"):
            assert f"text_encoder.bert.encoder.layer.{layer}.crossattention.{name}" in fresh
    assert not any("layer.0" in k or "layer.1" in k or ".cls." in k for k in fresh)
    assert not report.missing and not report.unexpected
    assert "crossattention" in str(report)
    hf_sd = hf.state_dict()
    assert torch.equal(model.text_encoder.bert.encoder.layer[3].output.dense.weight,
                       hf_sd["bert.encoder.layer.3.output.dense.weight"])
    assert torch.equal(model.text_encoder.cls.predictions.transform.dense.weight,
                       hf_sd["cls.predictions.transform.dense.weight"])
    # The momentum encoder is an exact copy, fresh cross-attention included.
    for (n, p), (_, p_m) in zip(model.text_encoder.named_parameters(), model.text_encoder_m.named_parameters()):
        assert torch.equal(p, p_m), n


def test_hf_bert_size_mismatch_is_an_error_naming_key_and_shapes(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512), add_pooling_layer=True)
    hf.save_pretrained(tmp_path / "vocab")
    with pytest.raises(weights.WeightLoadError,
                       match=r"word_embeddings\.weight.*source 120x32 vs model 100x32"):
        weights.load_hf_bert(ALBEF(tiny_model_cfg(max_position_embeddings=512)), tmp_path / "vocab")

    deep = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512))
    deep.save_pretrained(tmp_path / "deep")
    with pytest.raises(weights.WeightLoadError, match="num_hidden_layers 6 vs model.text_depth 4"):
        weights.load_hf_bert(ALBEF(tiny_model_cfg(max_position_embeddings=512)), tmp_path / "deep")

    wide = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(weights.WeightLoadError) as err:
        weights.load_hf_bert(ALBEF(tiny_model_cfg(max_position_embeddings=512)), tmp_path / "wide")
    message = str(err.value)
    # one line naming the setting, not a dump of every tensor's shapes
    assert "config.json does not match the model: hidden_size 64 vs model.text_width 32" in message
    assert "shape mismatch" not in message and len(message) < 300, len(message)
