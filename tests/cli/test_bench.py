"""``albef-ds bench``: the reference option set is no strawman (it gives the fast path's
losses on the same inputs, weights and draws), and the command runs end to end in a short
mode (no timing is asserted anywhere).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef_ds.cli import bench
from albef_ds.config import load_config

from tests.support.launch import in_process

REPO = Path(__file__).resolve().parents[2]

#: the tiny preset shrunk further; dropout 0 so that both option sets compute the same
#: numbers (with dropout they would draw different masks: SDPA and the explicit softmax
#: consume the generator differently).
SMALL = ["model.image_res=32", "model.patch_size=8", "model.vision_width=32", "model.vision_depth=2",
         "model.vision_heads=2", "model.text_width=32", "model.text_depth=4", "model.fusion_layer=2",
         "model.text_heads=2", "model.text_intermediate=64", "model.vocab_size=100",
         "model.max_position_embeddings=32", "model.embed_dim=16", "model.queue_size=64",
         "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "train.micro_batch_size=8",
         "data.max_tokens=12", "model.alpha=0.4", "model.mlm_probability=0.3"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def runner(spec: str, *extra: str) -> bench.Runner:
    overrides, switches = bench.parse_options(spec)
    cfg = load_config("tiny", SMALL + list(extra) + overrides)
    return bench.Runner(cfg, switches, cfg.train.micro_batch_size, cfg.data.max_tokens, torch.device("cpu"))


def test_presets_differ_in_every_switch_they_name():
    ref_o, ref_b = bench.parse_options("reference")
    fast_o, fast_b = bench.parse_options("fast")
    ref, fast = dict(o.split("=") for o in ref_o), dict(o.split("=") for o in fast_o)
    for name, ref_value, fast_value in bench.SWITCHES:
        if name in ("autocast", "compile", "model.activation_checkpointing", "model.mlm_masked_bucket",
                    "model.fp8"):
            continue  # not in the exact fp32 fast path (their own presets/switches)
        got_ref = ref.get(name, ref_b.get(name))
        got_fast = fast.get(name, fast_b.get(name))
        assert (got_ref, got_fast) == (ref_value, fast_value), name
    assert ref["model.itm_negatives"] == "local" and ref["model.itc_candidates"] == "local"
    _, bf16 = bench.parse_options("fast-bf16")
    assert bf16["autocast"] == "bf16" and bf16["fused_adam"] == "true"
    # a later switch wins over the preset it follows
    o, b = bench.parse_options("fast,model.sdpa=false,host_sync=true")
    assert o[-1] == "model.sdpa=false" and b["host_sync"] == "true"


def test_reference_and_fast_give_the_same_losses_over_three_steps():
    """Same weights (seeded build), inputs, masking and ITM draws; three full steps, so the
    optimizer (loop vs foreach AdamW), the EMA (per-parameter vs foreach) and the queues
    (broadcast or not) are compared too."""
    ref, fast = runner("reference"), runner("fast")
    assert not ref.model.cfg.sdpa and fast.model.cfg.sdpa
    assert not ref.model.cfg.share_cross_kv and fast.model.cfg.share_cross_kv
    assert not ref.model.cfg.mlm_masked_only and fast.model.cfg.mlm_masked_only
    assert not ref.model.cfg.itm_vectorized_sampling and fast.model.cfg.itm_vectorized_sampling
    for a, b in zip(ref.model.state_dict().values(), fast.model.state_dict().values()):
        assert torch.equal(a, b)
    for step in range(3):
        out_r, out_f = ref.step(), fast.step()
        assert torch.equal(out_r["neg_text_idx"], out_f["neg_text_idx"]), step
        assert torch.equal(out_r["neg_image_idx"], out_f["neg_image_idx"]), step
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            torch.testing.assert_close(out_r[key], out_f[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key, s=step: f"step {s} {k}: {m}")
        assert out_f["loss_mlm"] > 1.0 and out_f["loss_itm"] > 0.1  # real losses
    torch.testing.assert_close(ref.model.image_queue, fast.model.image_queue, rtol=1e-4, atol=1e-5)
    assert int(ref.model.queue_ptr) == int(fast.model.queue_ptr) == 3 * 8
    # logging: host floats every step in the reference, one device sum in the fast path
    assert len(ref.logged) == 3 and isinstance(ref.logged[0]["loss"], float)
    assert len(fast.logged) == 1 and fast.logged[0].shape == (len(bench.LOGGED),)
    torch.testing.assert_close(fast.logged[0][0].item(), sum(r["loss"] for r in ref.logged),
                               rtol=1e-4, atol=1e-5)


def test_bf16_autocast_and_activation_checkpointing_stay_close_to_the_reference():
    ref, ckpt, bf16 = runner("reference"), runner("fast,model.activation_checkpointing=true"), runner("fast-bf16")
    out_r, out_c, out_b = ref.step(), ckpt.step(), bf16.step()
    torch.testing.assert_close(out_r["loss"], out_c["loss"], rtol=1e-4, atol=1e-5)
    # bf16 keeps 8 bits of mantissa: the same losses to about 2 %
    torch.testing.assert_close(out_r["loss"], out_b["loss"].float(), rtol=2e-2, atol=2e-2)


def test_speedup_is_the_ratio_of_median_step_times():
    s = bench.speedup([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])
    assert s["ratio"] == 3.0 / 1.0 and s["paired_median"] == 2.0 and s["n"] == 3


def test_bench_cli_compare_short_mode_writes_parsable_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = ["bench", "--config", "tiny", "--device", "cpu",
           "--engine-free", "--compare", "reference", "fast", "--steps", "1", "--warmup", "0", "--json", str(out)]
    for o in SMALL:
        cmd += ["--set", o]
    code, output = in_process(cmd)
    assert code == 0, output[-3000:]
    assert "fast / reference" in output
    result = json.loads(out.read_text())
    names = [r["options"] for r in result["results"]]
    assert names == ["reference", "fast"]
    for r in result["results"]:
        assert r["pairs_per_s"] > 0 and r["flops_per_pair"] > 0 and r["batch"] == 8
        assert {"image_encoder", "text_encoder", "itm_fusion", "mlm", "backward", "optimizer",
                "ema"} <= set(r["phases_ms"])
    assert "queue_broadcast" in result["results"][0]["phases_ms"]
    assert result["ratio"] > 0 and result["n"] == 1


def test_bench_switches_mode_runs_each_pair(tmp_path, monkeypatch):
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "switches.json"
    args = p.parse_args(["--config", "tiny", "--device", "cpu", "--engine-free", "--switches", "--only",
                         "sdpa,host_sync", "--steps", "1", "--warmup", "0", "--json", str(out)]
                        + [x for o in SMALL for x in ("--set", o)])
    assert bench.run(args) == 0
    rows = json.loads(out.read_text())["switches"]
    assert [(r["switch"], r["a"], r["b"]) for r in rows] == [
        ("none", "fast", "fast"),
        ("model.sdpa", "reference", "reference,model.sdpa=true"),
        ("model.sdpa", "fast,model.sdpa=false", "fast"),
        ("host_sync", "reference", "reference,host_sync=false"),
        ("host_sync", "fast,host_sync=true", "fast"),
    ]
    assert all(r["ratio"] > 0 and r["a_saved_mb"] > 0 for r in rows)


def test_switches_not_in_fast_are_added_to_it():
    assert bench.switch_specs("autocast", "none", "bf16")[1] == ("autocast on fast", "fast", "fast,autocast=bf16")
    assert bench.switch_specs("model.sdpa", "false", "true")[1] == (
        "model.sdpa off fast", "fast,model.sdpa=false", "fast")


def test_activation_checkpointing_keeps_less_for_backward():
    plain, ckpt = runner("fast"), runner("fast,model.activation_checkpointing=true")
    assert ckpt.saved_activation_bytes() < 0.7 * plain.saved_activation_bytes()


def test_sdpa_runs_on_cpu_only_where_it_pays_off():
    from albef_ds.models.bert import sdpa_pays_off
    q = torch.zeros(1, 1, 2, 4)
    assert sdpa_pays_off(q, 0.0)
    assert not sdpa_pays_off(q, 0.1)  # no fused CPU kernel with dropout
    assert not sdpa_pays_off(q.bfloat16(), 0.0)  # the CPU flash kernel is slow in bf16


def test_vit_uses_explicit_attention_under_cpu_bf16_autocast_with_the_same_result():
    from albef_ds.models.vit import build_vit
    torch.manual_seed(0)
    vit = build_vit(32, 8, 32, 2, 2).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = vit(images)
        assert all(b.attn.fused_attn for b in vit.blocks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vit(images)
        assert not any(b.attn.fused_attn for b in vit.blocks)
        for b in vit.blocks:  # the explicit form in fp32 computes the same tokens
            b.attn.fused_attn = False
        explicit = vit.forward_features(images)
        assert vit(images) is not None and all(b.attn.fused_attn for b in vit.blocks)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_explicit_bert_attention_under_bf16_autocast_stays_close_to_fp32():
    from albef_ds.config import ModelConfig
    from albef_ds.models.bert import BertSelfAttention
    torch.manual_seed(0)
    attn = BertSelfAttention(ModelConfig(text_width=32, text_heads=2, sdpa=False, attention_dropout=0.0), 32).eval()
    x = torch.randn(3, 24, 32)
    with torch.no_grad():
        ref = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.slow
def test_bench_times_the_trainer_step_pretraining_takes(synth_data, tmp_path):
    """``albef-ds bench --data`` runs Trainer.train_step on the first batch of the training
    data: its first step's losses are those pretraining logs for step 1 (same batch, same
    seed), exactly; its report gives executed FLOPs next to the reference algorithm's."""
    data, tok = synth_data
    common = ["--config", "tiny", "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}",
              "--set", "model.vision_depth=2", "--set", "model.text_depth=2", "--set", "model.fusion_layer=1",
              "--set", "train.micro_batch_size=16", "--set", "data.num_workers=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "albef_ds", "bench", *common, "--data", "--steps", "1",
                           "--warmup", "0", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Trainer.train_step" in proc.stdout
    bench_run = json.loads(out.read_text())
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "albef_ds", "pretrain", *common, "--run-dir", str(run),
                           "--set", "train.max_steps=1", "--set", "logging.log_every=1",
                           "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc"):
        assert bench_run["losses"][0][key] == logged[key], key
    assert bench_run["mode"] == "trainer" and bench_run["zero_stage"] == 2
    assert bench_run["executed_flops_per_pair"] > 0 and bench_run["reference_flops_per_pair"] > 0
    assert bench_run["executed_flops_per_pair"] != bench_run["reference_flops_per_pair"]


def test_executed_flops_drop_what_the_fast_paths_skip():
    from albef_ds.model_info import analytic_flops, executed_flops
    ref = load_config("tiny", ["model.share_cross_kv=false", "model.mlm_masked_only=false",
                               "model.itm_negatives=local"])
    assert executed_flops(ref, 30) == pytest.approx(analytic_flops(ref, 30)["total"])
    masked = load_config("tiny", ["model.share_cross_kv=false", "model.mlm_masked_only=true",
                                  "model.itm_negatives=local"])
    shared = load_config("tiny", ["model.share_cross_kv=true", "model.mlm_masked_only=false",
                                  "model.itm_negatives=local"])
    pooled = load_config("tiny", ["model.share_cross_kv=false", "model.mlm_masked_only=false",
                                  "model.itm_negatives=pool"])
    assert executed_flops(masked, 30) < executed_flops(ref, 30)
    assert executed_flops(shared, 30) < executed_flops(ref, 30)
    assert executed_flops(pooled, 30) > executed_flops(ref, 30)  # negative captions re-encoded
