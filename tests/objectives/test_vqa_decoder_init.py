"""VQA from a pretraining checkpoint (the reference's ALBEF.pth layout, or an export of ours):
the answer decoder is built from the checkpoint's text encoder and its momentum copy from the
checkpoint's MOMENTUM text encoder, as the reference's VQA.py renames the keys
(``text_encoder_m.bert.encoder.layer.{fusion + i}`` -> ``text_decoder_m.bert.encoder.layer.{i}``,
embeddings and MLM head likewise). Compared tensor by tensor with the checkpoint, the keys
mapped here by that rule, written out."""
import re

import pytest
import torch

from albef_ds.train.export import resolve_init, save_exported
from albef_ds.train.trainer import build_model, make_objective
from albef_ds.weights import export_albef_state_dict
from tests.support.layouts import randomise, small_cfg

FUSION = 2  # small_cfg: text_depth 4, fusion_layer 2 -> a 2-layer decoder


def reference_key(decoder_key: str) -> str:
    """The checkpoint key the reference copies into ``decoder_key`` (text_decoder(_m).…)."""
    key = re.sub(r"^text_decoder((?:_m)?)\.", r"text_encoder\1.", decoder_key)
    return re.sub(r"\.encoder\.layer\.(\d+)\.", lambda m: f".encoder.layer.{int(m.group(1)) + FUSION}.", key)


def pretrained_source(tmp_path):
    """A pretraining model whose momentum weights differ from its online ones (as after
    training), saved in the reference layout and as an export of ours."""
    cfg = small_cfg("pretrain")
    model = build_model(cfg, log=lambda *a: None)
    randomise(model, 1)
    with torch.no_grad():  # momentum = online + a different perturbation: every tensor differs
        for _, p, p_m in model.momentum_named_params():
            p_m.copy_(p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state = export_albef_state_dict(model, layout="pretrain")
    torch.save({"model": state}, tmp_path / "ALBEF.pth")
    save_exported(model, cfg, tmp_path / "export")
    return state


@pytest.mark.parametrize("source", ["reference_pth", "our_export"])
def test_momentum_decoder_comes_from_the_checkpoints_momentum_encoder(tmp_path, source):
    state = pretrained_source(tmp_path)
    init = tmp_path / "ALBEF.pth" if source == "reference_pth" else resolve_init(str(tmp_path / "export"))
    cfg = small_cfg("vqa", init=init)
    assert cfg.task.distill
    model = build_model(cfg, log=lambda *a: None, objective=make_objective(cfg, None))

    for part in ("text_decoder", "text_decoder_m"):
        decoder = getattr(model, part).state_dict(prefix=part + ".")
        assert any(".encoder.layer.1.crossattention." in k for k in decoder)  # fusion layers' cross-attention too
        for key, value in decoder.items():
            assert torch.equal(value, state[reference_key(key)]), (key, reference_key(key))
    # the two decoders differ (the online one was not copied into the momentum one)
    online, momentum = model.text_decoder.state_dict(), model.text_decoder_m.state_dict()
    assert all(not torch.equal(online[k], momentum[k]) for k in online if online[k].is_floating_point())
