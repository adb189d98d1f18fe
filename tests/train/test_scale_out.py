"""Per-rank costs that must not grow with the world size: 1, 2 and 4 real CPU ranks.

Runs (the session's table, tests/support/runs.py; tiny model, global batch 16 at every size):
  z2_w1/z2_w2/z2_w4   ZeRO-2 at 1/2/4 ranks (z2_w4: 8 steps, checkpoints at 4 and 8)
  z2_w4_to2           z2_w4's step-4 checkpoint resumed on 2 ranks to step 8 (universal)
  z3_w1/z3_w2/z3_w4   ZeRO-3 (persistence threshold 100: partitioned momentum)
Procedures (here, run once):
  z3_opens            z3_w2's step 16 resumed on 2 ranks to step 18, every opened file recorded
  z3_killed           4 ranks, SIGKILLed while writing its step-8 checkpoint, resumed on 2;
                      z3_ref: its step-4 checkpoint resumed on 2 ranks to step 8 in a fresh
                      run directory (no kill): what z3_killed must equal
  z3_w4_missing       a copy of z3_w4 without albef_rank00003.pt, resumed (1 rank): refused
  z2_w4_fails         a copy of z2_w4 resumed on 4 ranks, rank 3 raising at resume: the job
                      must end (the in-process checks of the same machinery:
                      test_resume_integrity.py; ZeRO-3 with every parameter partitioned there too)
"""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.launch import albef_command, call, env, in_process
from tests.support.runs import keys

pytestmark = pytest.mark.slow

#: momentum master + queue files + per-rank RNG: what we write (DeepSpeed's optimizer
#: partitions and module states are DeepSpeed's own, sized by it).
OURS = re.compile(r"albef_.*")


def resume_recording_opens(runs):
    """z3_w2's step-16 checkpoint resumed on 2 ranks, every file each rank opens recorded."""
    run_dir, opens = runs.root / "z3_opens", runs.root / "opens"
    args = runs.args("z3_w2", run_dir, ["--set", "train.max_steps=18", "--resume",
                                         str(runs.checkpoint("z3_w2@16"))])
    call(albef_command(2, args, module="tests.support.drivers.record_opens"), runs.root / "z3_opens.log",
         ALBEF_OPEN_LOG=str(opens))
    return {r: (runs.root / f"opens.rank{r}").read_text().split() for r in (0, 1)}


def kill_mid_save_then_resume(runs):
    """4 ranks of z3_w4's recipe to step 8, SIGKILLed while the step-8 checkpoint is being
    written, resumed on 2; and the reference: its step 4 resumed on 2 ranks, no kill."""
    killed = runs.root / "z3_killed"
    args = runs.args("z3_w4", killed, ["--set", "train.max_steps=8"])
    with open(runs.root / "z3_killed.log", "w") as f:
        proc = subprocess.Popen(albef_command(4, args), env=env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        partial = killed / "checkpoints" / "step_00000008.partial"
        deadline = time.time() + 400
        while not (partial.is_dir() and list(partial.glob("*.pt"))) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial_files = sorted(p.name for p in partial.glob("*")) if partial.is_dir() else None
    two = lambda run_dir, extra: runs.args("z3_w2", run_dir, ["--set", "train.max_steps=8", *extra])  # noqa: E731
    call(albef_command(2, two(killed, ["--resume", "auto"])), runs.root / "z3_killed_resumed.log")
    ref = runs.root / "z3_ref"
    call(albef_command(2, two(ref, ["--resume", str(killed / "checkpoints" / "step_00000004")])),
         runs.root / "z3_ref.log")
    return killed, ref, partial_files


def resume_without_a_rank_file(runs):
    """A 4-rank ZeRO-3 checkpoint missing one rank's file, resumed (on 1 rank, in-process:
    the verification that refuses it comes before anything depends on the world size)."""
    missing = runs.root / "z3_w4_missing"
    shutil.copytree(runs.get("z3_w4").dir, missing)
    (missing / "checkpoints" / "step_00000004" / "albef_rank00003.pt").unlink()
    code, text = in_process(runs.args("z3_w1", missing, ["--set", "train.max_steps=6"]))
    return missing, code, text


def fail_at_resume_on_4_ranks(runs):
    """A copy of z2_w4 resumed on 4 ranks, rank 3 raising at resume while the others wait in
    the load's collectives; timed from the failure to the end of every process."""
    run_dir = runs.root / "z2_w4_fails"
    shutil.copytree(runs.get("z2_w4").dir, run_dir)
    shm_before = set(os.listdir("/dev/shm"))
    cmd = albef_command(4, runs.args("z2_w4", run_dir, ["--set", "train.max_steps=10"]),
                        module="tests.support.drivers.inject_error", launcher="deepspeed")
    proc = subprocess.Popen(cmd, env=env(INJECT_IN="resume", INJECT_RANK="3"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    text = proc.communicate(timeout=600)[0]
    ended = time.time()
    try:
        os.killpg(proc.pid, 0)
        left = True  # a process of the launch's session is still there
    except ProcessLookupError:
        left = False
    port = cmd[cmd.index("--master_port") + 1]
    return {"code": proc.returncode, "text": text, "ended": ended, "left": left,
            "new_shm": [name for name in sorted(set(os.listdir("/dev/shm")) - shm_before)
                        if _of_this_job(name, port, runs.data)]}


def _of_this_job(shm_name: str, port: str, data: Path) -> bool:
    """A /dev/shm entry of the job: DeepSpeed's all-reduce buffer for its port, or a
    streaming segment whose prefix serves its shards (another pytest-xdist worker's runs
    read their own copy of the synth data, another SLURM job its own)."""
    from albef_ds.data.shm import SHM_DIR, _locals_of
    if shm_name.startswith("deepspeed_allreduce_buffer_"):
        return f"_{port}_" in shm_name
    prefix = re.match(r"(\d{6})_", shm_name)
    if prefix is None:
        return False
    served = _locals_of(int(prefix.group(1)), SHM_DIR)
    return served is None or any(str(data) in d for d in served)


@pytest.fixture(scope="module")
def scale(runs):
    out = {name: runs.get(name).dir for name in ("z2_w1", "z2_w2", "z2_w4", "z3_w1", "z3_w2", "z3_w4")}
    out["z2_w4to2"] = runs.get("z2_w4_to2")
    out["opens"] = runs.once("z3_opens", resume_recording_opens)
    out["z3_killed"], out["z3_ref"], out["killed_partial_files"] = runs.once("z3_killed", kill_mid_save_then_resume)
    out["z3_killed_resumed_log"] = (runs.root / "z3_killed_resumed.log").read_text()
    out["z3_w4_missing"] = runs.once("z3_w4_missing", resume_without_a_rank_file)
    out["z2_w4_fails"] = runs.once("z2_w4_fails", fail_at_resume_on_4_ranks)
    return out


def sizes(tag_dir: Path) -> tuple[int, int]:
    """(bytes of our files, bytes of DeepSpeed's) in one checkpoint."""
    ours = sum(p.stat().st_size for p in tag_dir.iterdir() if OURS.fullmatch(p.name))
    theirs = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file() and not OURS.fullmatch(p.name))
    return ours, theirs


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_checkpoint_bytes_do_not_grow_with_the_world_size(scale, stage):
    ours = {w: sizes(scale[f"{stage}_w{w}"] / "checkpoints" / "step_00000004")[0] for w in (1, 2, 4)}
    for w in (2, 4):
        assert abs(ours[w] / ours[1] - 1) < 0.10, ours
    # What used to be written per rank (the whole fp32 momentum master) is there once.
    momentum = (scale[f"{stage}_w4"] / "checkpoints" / "step_00000004" / "albef_momentum.pt").stat().st_size
    assert momentum < 0.9 * ours[4] or stage == "z3", (momentum, ours)


def test_a_same_world_resume_opens_only_its_own_rank_files(scale):
    for rank, paths in scale["opens"].items():
        tag = [p for p in paths if "step_00000016" in p]
        assert tag, paths
        for path in tag:
            name = Path(path).name
            owner = re.search(r"rank_?(\d+)", name)
            if owner:  # a per-rank file (DeepSpeed's zero_pp_rank_N_..., our albef_rankN)
                assert int(owner.group(1)) == rank, f"rank {rank} opened {name}"
        names = {Path(p).name for p in tag}
        assert f"albef_rank{rank:05d}.pt" in names and "albef_momentum.pt" in names


def test_resume_on_fewer_ranks_continues_with_the_same_samples_per_global_step(scale):
    four = [keys(scale["z2_w4"], r) for r in range(4)]
    two = [keys(scale["z2_w4to2"].dir, r) for r in range(2)]
    for step in range(4, 8):
        assert sorted(two[0][(step, 0)] + two[1][(step, 0)]) == sorted(k for f in four for k in f[(step, 0)]), step
    assert "universal" in scale["z2_w4to2"].text


def test_a_save_killed_midway_is_never_mixed_into_a_later_save(scale):
    assert scale["killed_partial_files"] is not None, "the kill did not land during the step-8 save"
    log = scale["z3_killed_resumed_log"]
    assert re.search(r"resumed from .*step_00000004 \(world 4 -> 2", log), log[-3000:]
    tag = scale["z3_killed"] / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in tag.glob("albef_rank*")) == ["albef_rank00000.pt", "albef_rank00001.pt"]
    assert not list((scale["z3_killed"] / "checkpoints").glob("*.partial"))
    # Its momentum equals that of the same world-size history without the kill.
    from albef_ds.config import load_config
    from albef_ds.train.export import consolidate
    cfg = load_config(scale["z3_killed"] / "config.yaml")
    got = consolidate(tag, cfg).state_dict()
    want = consolidate(scale["z3_ref"] / "checkpoints" / "step_00000008", cfg).state_dict()
    momentum = [k for k in want if "_m." in k]
    assert momentum and all(torch.equal(got[k], want[k]) for k in momentum)


def test_a_zero3_checkpoint_missing_a_rank_file_is_refused_naming_it(scale):
    """It used to resume with a quarter of the momentum master zero-filled, exit 0."""
    missing, code, text = scale["z3_w4_missing"]
    assert code == 2, text[-3000:]
    assert f"{missing}/checkpoints/step_00000004/albef_rank00003.pt: missing" in text, text[-3000:]
    assert "nothing was loaded or changed" in text and not (missing / "checkpoints" / "universal").exists()


def test_a_rank_failing_at_resume_ends_the_4_rank_job_within_30_s(scale):
    out = scale["z2_w4_fails"]
    text = out["text"]
    assert out["code"] != 0 and "injected failure at resume" in text, text[-3000:]
    injected = float(re.search(r"INJECTED (\d+\.\d+)", text).group(1))
    assert out["ended"] - injected < 30, f"the job ended {out['ended'] - injected:.1f} s after the failure"
    assert "ends: another rank failed (rank 3: RuntimeError: injected failure at resume)" in text
    assert not out["left"], "a process of the job outlived it"
    # Nothing of the job left in /dev/shm: DeepSpeed's all-reduce buffers, streaming's segments.
    assert out["new_shm"] == [], out["new_shm"]
