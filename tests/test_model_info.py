"""albef-ds model-info: parameter counts against the paper's sizes, analytic FLOPs against
torch's FlopCounterMode run here on the same configuration, device peaks."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from albef_ds import cli
from albef_ds.objectives.pretrain import albef_forward
from albef_ds.config import load_config
from albef_ds.model_info import analytic_flops, count_params, device_peak_flops
from albef_ds.models import ALBEF

#: What the reference computes (model-info's definition): K/V recomputed per fusion pass,
#: MLM logits at every position, ITC/ITM on the local batch.
REFERENCE = ["model.share_cross_kv=false", "model.mlm_masked_only=false",
             "model.itc_candidates=local", "model.itm_negatives=local"]


def run_cli(capsys, *argv) -> str:
    assert cli.main(["model-info", *argv]) == 0
    return capsys.readouterr().out


def test_base_parameter_counts_match_the_paper(capsys):
    out = run_cli(capsys, "--config", "configs/albef-base.yaml")
    assert "visual encoder (ViT)" in out and "85,844,736" in out
    assert "text encoder (BERT)" in out and "123,697,722" in out
    data = json.loads(run_cli(capsys, "--config", "configs/albef-base.yaml", "--json"))
    p = data["params"]
    assert p["visual_encoder"] == 85_844_736
    assert p["text_encoder"] == 123_697_722
    assert p["text_encoder"] == (p["text_encoder.embeddings"] + p["text_encoder.text_layers"]
                                 + p["text_encoder.fusion_layers"] + p["text_encoder.mlm_head"])
    # 6 fusion layers x (4 linears 768x768 + biases + LayerNorm) of cross-attention.
    assert p["text_encoder.cross_attention"] == 6 * (4 * (768 * 768 + 768) + 2 * 768)
    assert p["projections"] == 2 * (768 * 256 + 256) and p["itm_head"] == 768 * 2 + 2
    # The momentum copies: every online part but temp and the ITM head.
    assert p["momentum"] == p["trainable"] - p["temp"] - p["itm_head"]
    # ≈ 300 GFLOP per pair at 256 px and 30 tokens (the figure).
    assert data["text_len"] == 30
    assert data["flops_per_pair"]["total"] == pytest.approx(300e9, rel=0.05)


def test_count_params_counts_tied_tensors_once():
    model = ALBEF(load_config("tiny").model)
    p = count_params(model)
    unique = {id(t): t.numel() for t in model.parameters()}
    assert p["total"] == sum(unique.values())
    assert p["text_encoder"] == sum({id(t): t.numel() for t in model.text_encoder.parameters()}.values())
    assert p["buffers"] == sum(b.numel() for b in model.buffers())


def counted_flops_per_pair(cfg, text_len: int, batch: int) -> float:
    torch.manual_seed(0)
    model = ALBEF(cfg.model).train()
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    images = torch.randn(batch, 3, m.image_res, m.image_res, generator=g)
    ids = torch.randint(5, m.vocab_size, (batch, text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, text_len // 2:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = ids[:, 2:5]
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(albef_forward, images, ids, mask, ids, labels, alpha=0.4)  # alpha > 0: momentum MLM runs
        out["loss"].backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("name,overrides,text_len", [
    ("tiny", [], 32),
    # albef-base shapes (ViT-B/16 at 256 px, BERT-base widths, full vocabulary and queue),
    # fewer layers to stay fast on a CPU.
    ("configs/albef-base.yaml", ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1"], 30),
])
def test_analytic_flops_within_5_percent_of_flop_counter(name, overrides, text_len):
    cfg = load_config(name, REFERENCE + overrides + ["train.micro_batch_size=2"])
    counted = counted_flops_per_pair(cfg, text_len, batch=2)
    analytic = analytic_flops(cfg, text_len)
    assert analytic["total"] == pytest.approx(sum(v for k, v in analytic.items() if k != "total"))
    assert analytic["total"] == pytest.approx(counted, rel=0.05)


def test_analytic_flops_do_not_depend_on_our_speed_switches():
    fast = load_config("configs/albef-base.yaml")
    ref = load_config("configs/albef-base.yaml", REFERENCE + ["model.sdpa=false"])
    assert analytic_flops(fast, 30) == analytic_flops(ref, 30)


def test_check_flops_flag_prints_the_ratio(capsys):
    out = run_cli(capsys, "--config", "tiny", "--check-flops")
    total = [line for line in out.splitlines() if "FlopCounterMode" in line or line.strip().startswith("total")]
    assert any("FlopCounterMode" in line for line in total)
    ratio = float(total[-1].split()[-1])
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_device_peak_flops():
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
    assert device_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert device_peak_flops("NVIDIA H200", "tf32") == pytest.approx(494.7e12)
    assert device_peak_flops("NVIDIA A100-SXM4-40GB", "tf32") == pytest.approx(156e12)
    assert device_peak_flops("NVIDIA A100 80GB PCIe", "float32") == pytest.approx(19.5e12)
    assert device_peak_flops("cpu", "fp32") is None
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "int3") is None
