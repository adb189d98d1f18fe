"""The scaling model: byte counts against a hand computation, and the step-time arithmetic."""

import pytest

from albef_ds import scaling
from albef_ds.config import load_config
from albef_ds.model_info import analytic_flops


def tiny(*overrides):
    # 64 px / patch 8 = 64 patches + CLS = 65 image tokens of width 128; embed_dim 64
    return load_config("tiny", ["model.patch_size=8", "model.image_res=64", "model.vision_width=128",
                                "model.embed_dim=64"] + list(overrides))


def test_bytes_per_rank_match_a_hand_computation():
    cfg = tiny("model.itm_negatives=pool", "model.itm_exchange=gather")
    b = scaling.comm_bytes(cfg, world=8, batch=32, text_len=32, params=1000, momentum_params=900,
                           zero_stage=2, dtype_bytes=2)
    ring = 7 / 8
    # momentum image + text features [32, 64] bf16 from each of 8 ranks
    assert b["feature_gather_buffer"] == 2 * 8 * 32 * 64 * 2 == 65536
    assert b["feature_gather_sent"] == pytest.approx(ring * 65536)
    # image ids, int64
    assert b["image_id_gather_buffer"] == 8 * 32 * 8
    # image embeddings [32, 65, 128] bf16 from 8 ranks, forward gather + backward reduce-scatter
    assert b["image_embed_gather_buffer"] == 8 * 32 * 65 * 128 * 2 == 4_259_840
    assert b["image_embed_gather_sent"] == pytest.approx(ring * 2 * 4_259_840)
    # text ids and mask [32, 32] int64
    assert b["text_id_gather_buffer"] == 2 * 8 * 32 * 32 * 8 == 131072
    # ZeRO-2: reduce-scatter of bf16 gradients + all-gather of bf16 parameters
    assert b["zero_buffer"] == 2 * 1000 * 2 and b["zero3_extra_buffer"] == 0
    assert b["zero_sent"] == pytest.approx(ring * 4000)
    assert b["total_sent"] == pytest.approx(ring * (65536 + 2048 + 2 * 4_259_840 + 131072 + 4000))


def test_zero3_adds_one_parameter_pass_and_the_momentum_gather():
    cfg = tiny()
    b = scaling.comm_bytes(cfg, 8, 32, 32, params=1000, momentum_params=900, zero_stage=3)
    # forward all-gather + backward all-gather + gradient reduce-scatter, + momentum forward
    assert b["zero_buffer"] == 3 * 2000 + 1800
    assert b["zero3_extra_buffer"] == 2000 + 1800


def test_local_negatives_and_selected_rows_and_one_rank():
    local = scaling.comm_bytes(tiny("model.itm_negatives=local"), 8, 32, 32, 1000, 900)
    assert local["image_embed_gather_buffer"] == 0 and local["text_id_gather_buffer"] == 0
    sel = scaling.comm_bytes(tiny("model.itm_negatives=pool"), 8, 32, 32, 1000, 900)  # rows: the default
    assert sel["image_embed_gather_buffer"] == 32 * 65 * 128 * 2
    # A pool of 2 ranks: the pool's traffic, whatever the world size.
    for world in (8, 64, 512):
        p2 = scaling.comm_bytes(tiny("model.negative_pool=2"), world, 32, 32, 1000, 900)
        assert p2["feature_gather_sent"] == pytest.approx(0.5 * 2 * 2 * 32 * 64 * 2)
        assert p2["image_embed_gather_sent"] == pytest.approx(0.5 * 2 * 32 * 65 * 128 * 2)
    one = scaling.comm_bytes(tiny(), 1, 32, 32, 1000, 900)
    assert one["total_sent"] == 0


def test_step_time_is_compute_plus_blocking_plus_exposed_zero():
    cfg = tiny("model.itm_negatives=local", "model.itc_candidates=local")
    net = scaling.Network(peak_flops=1e12, mfu=0.5, nvlink_gbs=1.0, ib_gbs=0.1, latency_s=0.0,
                          overlap=0.0)
    one = scaling.predict(cfg, 1, 32, 32, 1000, 900, net)
    flops = analytic_flops(cfg, 32, 32)["total"]
    assert one["compute_s"] == pytest.approx(32 * flops / 0.5e12)
    assert one["step_s"] == pytest.approx(one["compute_s"]) and one["efficiency"] == pytest.approx(1.0)
    eight = scaling.predict(cfg, 8, 32, 32, 1000, 900, net)
    b = eight["bytes"]
    assert eight["blocking_comm_s"] == pytest.approx(b["blocking_sent"] / 1e9)
    assert eight["zero_comm_s"] == pytest.approx(b["zero_sent"] / 1e9)
    assert eight["step_s"] == pytest.approx(eight["compute_s"] + eight["blocking_comm_s"] + eight["zero_comm_s"])
    # beyond one node the slower link applies
    big = scaling.predict(cfg, 64, 32, 32, 1000, 900, net)
    assert big["blocking_comm_s"] == pytest.approx(big["bytes"]["blocking_sent"] / 1e8)


def test_report_on_albef_base_covers_8_64_512_gpus_and_the_full_gather_costs_most():
    out = scaling.report(load_config("albef-base"), batch=64)
    worlds = {r["world"] for r in out["rows"]}
    assert {8, 64, 512} <= worlds
    by = {(r["variant"], r["zero_stage"], r["world"]): r for r in out["rows"]}
    assert by[("pool world, full gather", 2, 512)]["efficiency"] < by[("pool world, rows", 2, 512)]["efficiency"]
    # The preset's pool of 8 ranks (the paper's 512 pairs): our own bytes constant from 64 to 512 GPUs.
    preset = [v for v, _, _ in by if v.startswith("pool 8")][0]
    assert by[(preset, 2, 64)]["bytes"]["blocking_sent"] == by[(preset, 2, 512)]["bytes"]["blocking_sent"]
    assert all(0 < r["efficiency"] <= 1.0 + 1e-9 for r in out["rows"])
    text = scaling.format_report(out)
    assert "512" in text and "pairs/s/GPU" in text
