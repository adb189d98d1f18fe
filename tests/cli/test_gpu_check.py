"""``albef-ds gpu-check``: the CPU dry run end to end (every part, JSON and table), the
exactness comparison is not vacuous (a resumed run that differs fails), the doubling
search stops at the first out-of-memory, and scripts/gpu_check.sh parses and answers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef_ds import gpu_check as gc
from albef_ds.cli import bench

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-m", "albef_ds", "gpu-check", "--dry-run", "--out", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_says_it_is_a_dry_run(dry_run):
    out, stdout, report = dry_run
    assert report["dry_run"] is True and report["dry_run_reason"] == "--dry-run"
    assert "DRY RUN" in stdout and report["failed_parts"] == []
    env = report["environment"]
    for key in ("torch", "cuda_version", "device", "deepspeed", "fused_adam", "flash_sdpa", "bf16_supported"):
        assert key in env, key
    assert env["device"] == "cpu" and env["deepspeed"]

    step = report["trainer_step"]
    assert step["config"] == "tiny" and step["precision"] == "fp32"
    assert [r["batch"] for r in step["results"]] == [4, 8]  # the timed batch, then the search's largest
    assert step["largest_batch"]["largest"] == 8 and step["largest_batch"]["tried"] == [[8, "ok"]]
    for r in step["results"]:
        assert r["pairs_per_s"] > 0 and r["reference_flops_per_pair"] > 0 and r["executed_flops_per_pair"] > 0
        assert "mfu" not in r and r["executed_util"] is None  # no peak FLOP/s for a CPU

    sw = report["switches"]
    assert sw["all_switches"] == [name for name, _, _ in bench.SWITCHES]  # read from the bench, not copied
    assert [r["switch"] for r in sw["rows"]][0] == "none"
    assert {r["switch"] for r in sw["rows"][1:]} == set(sw["measured"]) and len(sw["measured"]) == 2
    assert all(r["ratio"] > 0 for r in sw["rows"]) and sw["skipped"] == []

    kr = report["kill_resume"]
    assert kr["ok"] and kr["exact"] and kr["interrupted"]
    assert kr["exit_status"] == {"uninterrupted": 0, "stopped": 3, "resumed": 0}
    assert kr["stopped_at"] == kr["stop_requested_after"] == 3
    assert kr["compared_steps"] == 3 and kr["tensors"] > 100 and kr["tensors_differing"] == 0

    assert report["fp16"] == {"status": "skipped: needs CUDA (DeepSpeed refuses fp16 on CPU)"}


@pytest.mark.slow
def test_the_dry_runs_table_is_the_one_printed_and_names_device_and_date(dry_run):
    out, stdout, report = dry_run
    table = (out / "gpu_check.md").read_text()
    assert table == gc.markdown_table(report) and table in stdout
    assert table.startswith(f"### gpu-check: cpu, {report['date']} (CPU DRY RUN")
    assert "| batch | pairs/s | ms/step | MFU | executed-FLOP util. | peak memory GiB |" in table
    assert "| 4 |" in table and "noise floor" in table
    assert "| kill/resume (6 steps, SIGTERM after step 3) | EXACT" in table
    assert "| fp16 loss scaling | skipped: needs CUDA (DeepSpeed refuses fp16 on CPU) |" in table


@pytest.mark.slow
def test_a_resumed_run_one_ulp_off_fails_the_comparison(dry_run):
    """The dry run's own runs, one value changed: the comparison must see it."""
    out = dry_run[0] / "kill_resume"
    ref, got = gc.per_step(out / "uninterrupted"), gc.per_step(out / "killed")
    ref_state, got_state = gc.final_state(out / "uninterrupted"), gc.final_state(out / "killed")
    assert gc.compare_runs(ref, got, 4, ref_state, got_state)["exact"]

    got[5]["loss_mlm"] = math.nextafter(got[5]["loss_mlm"], math.inf)
    result = gc.compare_runs(ref, got, 4, ref_state, got_state)
    assert not result["exact"] and result["loss_mismatches"][0]["step"] == 5

    got = gc.per_step(out / "killed")
    name = next(k for k, v in got_state.items() if v.is_floating_point() and v.numel() > 1)
    got_state[name] = got_state[name].clone()
    got_state[name].view(-1)[0] += 1e-6
    result = gc.compare_runs(ref, got, 4, ref_state, got_state)
    assert not result["exact"] and result["differing"] == [name] and result["max_abs_diff"] > 0


def test_the_comparison_is_never_vacuous():
    rows = {s: {"step": s, "loss": 1.0 / s, "loss_itc": 0.5} for s in range(1, 7)}
    state = {"w": torch.ones(3)}
    assert gc.compare_runs(rows, dict(rows), 4, state, dict(state))["exact"]
    # nothing to compare, a step missing, a tensor missing: each a failure
    assert not gc.compare_runs(rows, dict(rows), 7)["exact"]
    assert not gc.compare_runs(rows, {s: r for s, r in rows.items() if s != 5}, 4)["exact"]
    assert not gc.compare_runs(rows, dict(rows), 4, state, {})["exact"]
    assert not gc.compare_runs(rows, dict(rows), 4, {}, {})["exact"]


def test_a_kill_resume_that_differs_is_reported_as_failed_in_the_table():
    report = {"date": "2026-12-02 17:00 UTC", "dry_run": False,
              "environment": {"device": "NVIDIA H200", "torch": "2.11", "cuda_version": "13.0", "deepspeed": "0.19.8",
                              "fused_adam": {"loaded": True}, "flash_sdpa": {"runs": True}, "bf16_supported": True},
              "kill_resume": {"steps": 20, "signal": "SIGTERM", "stop_requested_after": 12, "ok": False,
                              "compared_steps": 8, "tensors": 184, "tensors_differing": 3},
              "fp16": {"status": "ran", "steps": [{}, {}], "loss_scales": [65536.0, 32768.0],
                       "all_finite": True, "skipped_steps": 1}}
    table = gc.markdown_table(report)
    assert table.startswith("### gpu-check: NVIDIA H200, 2026-12-02 17:00 UTC\n")
    assert "| FAILED: 8 steps' losses, 3 of 184 tensors differ |" in table
    assert "scales 65536, 32768; all losses finite; 1 steps skipped on overflow" in table


def test_the_search_doubles_until_out_of_memory_and_keeps_the_last_fit():
    seen = []

    def measure(batch):
        seen.append(batch)
        if batch > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": batch}

    out = gc.largest_batch(measure, 64, 4096)
    assert seen == [64, 128, 256, 512]
    assert out["largest"] == 256 and out["result"] == {"batch": 256} and not out["reached_limit"]
    assert out["tried"] == [[64, "ok"], [128, "ok"], [256, "ok"], [512, "oom"]]
    assert gc.largest_batch(measure, 64, 128)["reached_limit"]

    def broken(batch):
        raise ValueError("not a memory error")
    with pytest.raises(ValueError):
        gc.largest_batch(broken, 64, 128)


def test_the_loss_scale_is_read_where_deepspeed_keeps_it():
    class Scaler:
        cur_scale = 1024.0

    class Opt:
        loss_scaler = Scaler()

    class Engine:
        optimizer = Opt()
    assert gc.loss_scale_of(Engine()) == 1024.0


def test_the_wrapper_script_parses_and_answers_help_and_missing_wheels(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--wheels DIR" in out.stdout
    out = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and f"no wheels in {tmp_path}" in out.stderr


def test_the_cli_refuses_an_unknown_part(tmp_path):
    from albef_ds.cli import main
    assert main(["gpu-check", "--dry-run", "--out", str(tmp_path), "--skip", "everything"]) == 2


@pytest.mark.slow
def test_the_fp16_checks_loop_runs_in_fp32_on_a_cpu(synth_data, tmp_path):
    """fp16 itself needs CUDA; its loop (loader, Trainer, loss-scale read, shm release) is
    the same at fp32, which a CPU runs."""
    from albef_ds.cli.gpu_check import small_run_overrides
    data, tok = synth_data
    out = gc.scaled_steps("tiny", small_run_overrides(data, tok, 4, 1000, 0), 2, tmp_path / "run")
    assert out["status"] == "ran" and out["precision"] == "fp32" and len(out["steps"]) == 2
    assert [r["step"] for r in out["steps"]] == [1, 2] and out["all_finite"] and out["skipped_steps"] == 0
    if not torch.cuda.is_available():
        assert gc.fp16_check("tiny", [], 2, tmp_path / "fp16") == {"status": gc.CPU_FP16_SKIP}
