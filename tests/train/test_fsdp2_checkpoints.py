"""FSDP2 checkpoints (DCP) through ``albef-ds pretrain``: every rank writes its own shards,
a resume on the same world size is bit-exact, another world size reads them without a
conversion, and the bytes do not grow with the world size.

Runs (the session's table, tests/support/runs.py; tiny model, global batch 16, 8 steps,
checkpoints at 4 and 8):
  f2_w1 / f2_w2 / f2_w4   the fsdp2 engine at 1 / 2 / 4 ranks
  f2_w2_again             f2_w2's step-4 checkpoint resumed on 2 ranks in a new run dir
  f2_w4_to2               f2_w4's step-4 checkpoint resumed on 2 ranks
Procedures (here, run once):
  f2_killed               f2_w2's recipe SIGKILLed once its step-4 checkpoint is committed,
                          then ``--resume auto``
  f2_killed_mid_save      4 ranks SIGKILLed while the step-8 checkpoint is being written,
                          resumed on 2 (``--resume auto``)
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from albef_ds.gpu_check import compare_runs, final_state, per_step
from tests.support.launch import albef_command, call, env
from tests.support.runs import keys

pytestmark = pytest.mark.slow


def _kill_when(cmd, log: Path, ready, timeout: float = 300) -> None:
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_after_the_step_4_checkpoint(runs):
    run_dir = runs.root / "f2_killed"
    cmd = albef_command(2, runs.args("f2_w2", run_dir))
    marker = run_dir / "checkpoints" / "step_00000004" / "albef_meta.json"
    _kill_when(cmd, runs.root / "f2_killed.log", marker.exists)
    killed_at = max(per_step(run_dir))
    call(cmd + ["--resume", "auto"], runs.root / "f2_killed_resumed.log")
    return run_dir, killed_at


def kill_mid_save_then_resume_on_2(runs):
    run_dir = runs.root / "f2_killed_mid_save"
    partial = run_dir / "checkpoints" / "step_00000008.partial"
    _kill_when(albef_command(4, runs.args("f2_w4", run_dir)), runs.root / "f2_killed_mid_save.log",
               lambda: partial.is_dir() and any(partial.glob("*.distcp")))
    partial_files = sorted(p.name for p in partial.glob("*")) if partial.is_dir() else None
    text = call(albef_command(2, runs.args("f2_w2", run_dir, ["--resume", "auto"])),
                runs.root / "f2_killed_mid_save_resumed.log")[1]
    return run_dir, partial_files, text


@pytest.fixture(scope="module")
def f2(runs):
    out = {name: runs.get(name) for name in ("f2_w1", "f2_w2", "f2_w4", "f2_w2_again", "f2_w4_to2")}
    out["killed"], out["killed_at"] = runs.once("f2_killed", kill_after_the_step_4_checkpoint)
    out["mid_save"] = runs.once("f2_killed_mid_save", kill_mid_save_then_resume_on_2)
    return out


def test_every_rank_writes_its_own_shards_and_no_deepspeed_file(f2):
    for world in (1, 2, 4):
        tag = f2[f"f2_w{world}"].dir / "checkpoints" / "step_00000004"
        assert sorted(p.name for p in tag.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(world)]
        assert (tag / ".metadata").is_file() and not list(tag.glob("*zero_pp*")) and not list(tag.glob("mp_rank*"))
        assert "engine fsdp2" in f2[f"f2_w{world}"].text


def test_a_same_world_resume_is_bit_exact(f2):
    ref, got = f2["f2_w2"].dir, f2["f2_w2_again"].dir
    result = compare_runs(per_step(ref), per_step(got), 5, final_state(ref), final_state(got))
    assert result["exact"] and result["compared_steps"] == 4, result


def test_kill_9_then_resume_auto_continues_bit_exactly(f2):
    assert 4 <= f2["killed_at"] < 8, "the kill did not land between the step-4 checkpoint and the end"
    ref, got = f2["f2_w2"].dir, f2["killed"]
    result = compare_runs(per_step(ref), per_step(got), 5, final_state(ref), final_state(got))
    assert result["exact"], result
    for rank in (0, 1):
        k_ref, k_got = keys(ref, rank), keys(got, rank)
        assert all(k_got[k] == k_ref[k] for k in k_ref), rank


def test_4_to_2_ranks_continues_with_the_same_samples_per_global_step_without_a_conversion(f2):
    four = [keys(f2["f2_w4"].dir, r) for r in range(4)]
    two = [keys(f2["f2_w4_to2"].dir, r) for r in range(2)]
    for step in range(4, 8):
        assert sorted(two[0][(step, 0)] + two[1][(step, 0)]) == sorted(k for f in four for k in f[(step, 0)]), step
    assert "(world 4 -> 2, resharded on load)" in f2["f2_w4_to2"].text
    assert not (f2["f2_w4_to2"].dir / "checkpoints" / "universal").exists()
    # the optimizer state came along: the temperature continues from where 4 ranks had it
    t4, t2 = per_step(f2["f2_w4"].dir)[5]["temp"], per_step(f2["f2_w4_to2"].dir)[5]["temp"]
    assert abs(t4 - t2) < 1e-4, (t4, t2)


def test_checkpoint_bytes_do_not_grow_with_the_world_size(f2):
    """The DCP shards of a checkpoint: the same total at 1, 2 and 4 ranks (within 10 %),
    split evenly (no rank writes the whole model)."""
    shards = {w: [p.stat().st_size for p in sorted((f2[f"f2_w{w}"].dir / "checkpoints" / "step_00000004")
                                                       .glob("*.distcp"))] for w in (1, 2, 4)}
    total = {w: sum(s) for w, s in shards.items()}
    for w in (2, 4):
        assert abs(total[w] / total[1] - 1) < 0.10, total
        assert max(shards[w]) < 1.1 * total[w] / w, shards


def test_a_save_killed_midway_is_never_mixed_into_a_later_one(f2):
    run_dir, partial_files, text = f2["mid_save"]
    assert partial_files is not None, "the kill did not land during the step-8 save"
    assert "resumed from" in text and "step_00000004 (world 4 -> 2, resharded on load)" in text, text[-3000:]
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    tag = run_dir / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in tag.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
