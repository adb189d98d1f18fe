"""``albef-ds pretrain`` end to end: real DeepSpeed engines, 2 CPU ranks, synth shards.

Runs (one launch each, shared by the tests below):
  zero2   ZeRO-2 fp32, 20 steps, uninterrupted: the reference trajectory.
  killed  the same, SIGKILLed after its step-8 checkpoint, then ``--resume auto``.
  zero1   ZeRO-1 bf16, 20 steps.
  zero3   ZeRO-3 fp32 with a persistence threshold of 100 elements (partitioned EMA path).
  one     1 rank resuming zero2's step-12 checkpoint (universal checkpoint), same global batch.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared_runs import LAUNCH_VARS

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
MICRO = 8
#: fp32 ZeRO-2 and ZeRO-3 sum gradients in different orders; 20 steps stay this close.
ZERO3_TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(ranks: int, run_dir: Path, data, tok, extra=()) -> list[str]:
    args = ["pretrain", "--config", "tiny", "--run-dir", str(run_dir),
            "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}",
            "--set", f"train.max_steps={STEPS}", "--set", f"train.micro_batch_size={MICRO * 2 // ranks}",
            "--set", "train.lr=1e-3", "--set", "train.warmup_steps=2", "--set", "model.momentum=0.9",
            "--set", "model.vision_depth=2", "--set", "model.text_depth=2", "--set", "model.fusion_layer=1",
            "--set", "logging.log_every=1", "--set", "checkpoint.every_steps=4",
            "--set", "checkpoint.keep_last=10", "--set", "logging.log_sample_keys=true",
            "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "albef_ds", *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), "--module", "albef_ds", *args]


#: launch variables a launched process must not inherit from this one


def env():
    out = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return dict(out, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def launch(cmd, log: Path):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-5000:]}")


def per_step(run_dir: Path) -> dict:
    """step -> last logged metrics line (a resumed run appends)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row
    return out


def keys(run_dir: Path, rank: int) -> dict:
    """(step, micro) -> sample keys consumed by that rank (last occurrence wins)."""
    out = {}
    for line in (run_dir / f"sample_keys_rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[(row["step"], row["micro"])] = row["keys"]
    return out


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):
    data, tok = synth_data
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    out["zero2"] = root / "zero2"
    launch(command(2, out["zero2"], data, tok, ["--set", "distributed.ds_config=ds_configs/zero2_fp32.json"]),
           root / "zero2.log")

    # Killed after the step-8 checkpoint is complete, then resumed (TensorBoard on: its
    # curves must read as one run).
    out["killed"] = root / "killed"
    cmd = command(2, out["killed"], data, tok, ["--set", "distributed.ds_config=ds_configs/zero2_fp32.json",
                                                "--set", "logging.tensorboard=true"])
    with open(root / "killed.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        marker = out["killed"] / "checkpoints" / "step_00000008" / "albef_meta.json"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out["killed_at"] = max(per_step(out["killed"]))
    launch(cmd + ["--resume", "auto"], root / "resumed.log")

    out["zero1"] = root / "zero1"
    launch(command(2, out["zero1"], data, tok, ["--set", "distributed.ds_config=ds_configs/zero1_bf16.json"]),
           root / "zero1.log")

    ds3 = root / "zero3_fp32_low_threshold.json"
    ds3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
                               "steps_per_print": 1000000}))
    out["zero3"] = root / "zero3"
    launch(command(2, out["zero3"], data, tok, ["--set", f"distributed.ds_config={ds3}"]), root / "zero3.log")

    out["one"] = root / "one"
    launch(command(1, out["one"], data, tok,
                   ["--set", "distributed.ds_config=ds_configs/zero2_fp32.json", "--set", "train.max_steps=16",
                    "--resume", str(out["zero2"] / "checkpoints" / "step_00000012")]), root / "one.log")
    out["logs"] = root
    return out


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_each_zero_stage_trains_20_steps_and_writes_a_loadable_checkpoint(runs, name):
    rows = per_step(runs[name])
    assert sorted(rows) == list(range(1, STEPS + 1))
    for row in rows.values():
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "lr", "grad_norm", "pairs_per_s"):
            assert torch.isfinite(torch.tensor(row[key])), (name, row)
    assert (runs[name] / "DONE").is_file()
    assert (runs[name] / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    # Loadable: consolidated into a single-process model that runs.
    from albef_ds.config import load_config
    from albef_ds.train.export import consolidate
    cfg = load_config(runs[name] / "config.yaml")
    model = consolidate(runs[name] / "checkpoints" / f"step_{STEPS:08d}", cfg)
    assert int(model.queue_ptr) == (STEPS * 2 * MICRO) % cfg.model.queue_size


def test_kill_9_then_resume_auto_continues_identically(runs):
    assert 8 <= runs["killed_at"] < STEPS, "the kill did not land between the step-8 checkpoint and the end"
    ref, got = per_step(runs["zero2"]), per_step(runs["killed"])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
    for rank in (0, 1):
        k_ref, k_got = keys(runs["zero2"], rank), keys(runs["killed"], rank)
        later = [sk for sk in k_ref if sk[0] >= 8]
        assert later and all(k_got[sk] == k_ref[sk] for sk in later)
    # Nothing repeated or skipped over the whole job, across the kill.
    consumed = [k for r in (0, 1) for sk, ks in keys(runs["killed"], r).items() for k in ks]
    assert len(consumed) == len(set(consumed)) == STEPS * 2 * MICRO


def test_a_resumed_runs_logs_hold_each_step_once(runs):
    lines = [json.loads(line) for line in (runs["killed"] / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, STEPS + 1))
    for rank in (0, 1):
        rows = [json.loads(line) for line in (runs["killed"] / f"sample_keys_rank{rank}.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(STEPS))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs["killed"] / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1)), steps


def test_zero3_start_up_summary_counts_the_whole_parameters(runs):
    def counts(name):
        log = (runs["logs"] / f"{name}.log").read_text()
        found = re.search(r"parameters: ([\d,]+) trainable, ([\d,]+) momentum", log)
        return tuple(int(g.replace(",", "")) for g in found.groups())
    assert counts("zero3") == counts("zero2") and min(counts("zero2")) > 0


def test_resume_picked_the_last_complete_checkpoint(runs):
    log = (runs["logs"] / "resumed.log").read_text()
    found = re.search(r"resumed from .*step_(\d{8}) at step (\d+)", log)
    assert found, log[-2000:]
    assert 8 <= int(found.group(1)) <= runs["killed_at"]


def test_zero3_momentum_equals_zero2(runs):
    from albef_ds.train.ema import assemble_full
    last = f"step_{STEPS:08d}"

    from albef_ds.train.checkpoint import MOMENTUM_FILE, rank_files, read

    def masters(run):
        tag_dir = run / "checkpoints" / last
        full = read(tag_dir / MOMENTUM_FILE)
        partitions = [f["ema_partitions"] for f in rank_files(tag_dir)]
        return full, partitions, assemble_full(full, iter(partitions))
    full3, parts3, m3 = masters(runs["zero3"])
    _, parts2, m2 = masters(runs["zero2"])
    # Both EMA paths ran: partitions (ds_tensor) and persistent whole parameters.
    assert full3["full"] and parts3[0] and not any(parts2)
    assert set(m3) == set(m2)
    worst = max((m3[k] - m2[k]).abs().max().item() for k in m2)
    assert worst < ZERO3_TOL, f"momentum weights differ by {worst}"
    # The forward read the EMA'd weights too: the losses of every step agree.
    r2, r3 = per_step(runs["zero2"]), per_step(runs["zero3"])
    for step in r2:
        assert abs(r2[step]["loss"] - r3[step]["loss"]) < 1e-3, step


def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch(runs):
    rows = per_step(runs["one"])
    assert sorted(rows) == [13, 14, 15, 16]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    log = (runs["logs"] / "one.log").read_text()
    assert "universal" in log and "global 16" in log
    # The same global sample order: step s consumes, on 1 rank, the pairs 2 ranks consumed.
    one = keys(runs["one"], 0)
    two = [keys(runs["zero2"], r) for r in (0, 1)]
    for step in range(12, 16):
        assert sorted(one[(step, 0)]) == sorted(two[0][(step, 0)] + two[1][(step, 0)]), step


def test_export_to_the_albef_layout_loads_with_identical_outputs(runs, tmp_path):
    from albef_ds.cli import main
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    from albef_ds.train.export import load_exported
    from albef_ds.weights import load_albef_checkpoint

    assert main(["export", str(runs["zero3"]), "--out", str(tmp_path)]) == 0
    ours, cfg = load_exported(tmp_path)
    reloaded = ALBEF(load_config(tmp_path / "config.yaml").model)
    load_albef_checkpoint(reloaded, str(tmp_path / "albef.pth"))
    ours.eval(), reloaded.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.model.image_res, cfg.model.image_res, generator=g)
    ids = torch.randint(5, cfg.model.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for momentum in (False, True):
            a, b = ours.encode_image(images, momentum), reloaded.encode_image(images, momentum)
            assert torch.equal(a, b)
            ta, tb = ours.encode_text(ids, mask, momentum), reloaded.encode_text(ids, mask, momentum)
            assert torch.equal(ta, tb)
            assert torch.equal(ours.fuse(ta, mask, a, momentum=momentum), reloaded.fuse(tb, mask, b, momentum=momentum))
        assert torch.equal(ours.mlm_logits(ids, mask, a), reloaded.mlm_logits(ids, mask, b))
    assert torch.equal(ours.image_queue, reloaded.image_queue) and torch.equal(ours.temp, reloaded.temp)
