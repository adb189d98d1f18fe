"""``albef-ds pretrain`` end to end: real DeepSpeed engines, 2 CPU ranks, synth shards.

Runs (the session's table, tests/support/runs.py, shared with the other tests):
  zero2   z2_w2: ZeRO-2 fp32, 20 steps, uninterrupted: the reference trajectory.
  killed  the same, SIGKILLed after its step-8 checkpoint, then ``--resume auto`` (here).
  zero1   z1_w2: ZeRO-1 bf16, 20 steps.
  zero3   z3_w2: ZeRO-3 fp32 with a persistence threshold of 100 elements (partitioned EMA path).
  one     z2_w2_to1: 1 rank resuming zero2's step-12 checkpoint (universal), same global batch.
"""
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.support.launch import albef_command, call, env
from tests.support.runs import keys, per_step

pytestmark = pytest.mark.slow

STEPS = 20
MICRO = 8
#: fp32 ZeRO-2 and ZeRO-3 sum gradients in different orders; 20 steps stay this close.
ZERO3_TOL = 1e-4


def kill_after_the_step_8_checkpoint(runs):
    """z2_w2's run again (TensorBoard on: its curves must read as one run), SIGKILLed once
    its step-8 checkpoint is committed, then resumed with --resume auto."""
    run_dir = runs.root / "z2_w2_killed"
    cmd = albef_command(2, runs.args("z2_w2", run_dir, ["--set", "logging.tensorboard=true"]))
    with open(runs.root / "z2_w2_killed.log", "w") as f:
        proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        marker = run_dir / "checkpoints" / "step_00000008" / "albef_meta.json"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(per_step(run_dir))
    call(cmd + ["--resume", "auto"], runs.root / "z2_w2_resumed.log")
    return run_dir, killed_at


def trained_steps(run_dir) -> dict:
    """step -> its training row; a resumed launch's marker row (metrics.jsonl: event resume,
    at the step it resumed after) is none, and must not take that step's place."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "event" not in row}


@pytest.fixture(scope="module")
def runs_by_role(runs):
    killed, killed_at = runs.once("z2_w2_killed", kill_after_the_step_8_checkpoint)
    out = {"zero2": runs.get("z2_w2").dir, "zero1": runs.get("z1_w2").dir, "zero3": runs.get("z3_w2").dir,
           "one": runs.get("z2_w2_to1").dir, "killed": killed, "killed_at": killed_at}
    out["logs"] = {role: runs.get(name).log.read_text() for role, name in
                   (("zero2", "z2_w2"), ("zero3", "z3_w2"), ("one", "z2_w2_to1"))}
    out["logs"]["resumed"] = (runs.root / "z2_w2_resumed.log").read_text()
    return out


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_each_zero_stage_trains_20_steps_and_writes_a_loadable_checkpoint(runs_by_role, name):
    runs = runs_by_role
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


def test_kill_9_then_resume_auto_continues_identically(runs_by_role):
    runs = runs_by_role
    assert 8 <= runs["killed_at"] < STEPS, "the kill did not land between the step-8 checkpoint and the end"
    ref, got = per_step(runs["zero2"]), trained_steps(runs["killed"])
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


def test_a_resumed_runs_logs_hold_each_step_once(runs_by_role):
    runs = runs_by_role
    lines = [json.loads(line) for line in (runs["killed"] / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "event" not in row] == list(range(1, STEPS + 1))
    # one marker row, where the resumed launch took over (after its checkpoint's step)
    markers = [(i, row) for i, row in enumerate(lines) if "event" in row]
    assert len(markers) == 1 and markers[0][1]["event"] == "resume", markers
    at, marker = markers[0]
    assert marker["from"].endswith(f"step_{marker['step']:08d}") and lines[at - 1]["step"] == marker["step"], marker
    for rank in (0, 1):
        rows = [json.loads(line) for line in (runs["killed"] / f"sample_keys_rank{rank}.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(STEPS))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs["killed"] / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1)), steps


def test_zero3_start_up_summary_counts_the_whole_parameters(runs_by_role):
    runs = runs_by_role
    def counts(name):
        log = runs["logs"][name]
        found = re.search(r"parameters: ([\d,]+) trainable, ([\d,]+) momentum", log)
        return tuple(int(g.replace(",", "")) for g in found.groups())
    assert counts("zero3") == counts("zero2") and min(counts("zero2")) > 0


def test_resume_picked_the_last_complete_checkpoint(runs_by_role):
    runs = runs_by_role
    log = runs["logs"]["resumed"]
    found = re.search(r"resumed from .*step_(\d{8}) at step (\d+)", log)
    assert found, log[-2000:]
    assert 8 <= int(found.group(1)) <= runs["killed_at"]


def test_zero3_momentum_equals_zero2(runs_by_role):
    runs = runs_by_role
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


def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch(runs_by_role):
    runs = runs_by_role
    rows = trained_steps(runs["one"])  # (a run of its own, resumed from z2_w2's step 12)
    assert sorted(rows) == [13, 14, 15, 16]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    log = runs["logs"]["one"]
    assert "universal" in log and "global 16" in log
    # The same global sample order: step s consumes, on 1 rank, the pairs 2 ranks consumed.
    one = keys(runs["one"], 0)
    two = [keys(runs["zero2"], r) for r in (0, 1)]
    for step in range(12, 16):
        assert sorted(one[(step, 0)]) == sorted(two[0][(step, 0)] + two[1][(step, 0)]), step


def test_export_to_the_albef_layout_loads_with_identical_outputs(runs_by_role, tmp_path):
    runs = runs_by_role
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
