"""Per-rank costs that must not grow with the world size: 1, 2 and 4 real CPU ranks.

Runs (one launch each, shared by the tests; tiny model, global batch 16 at every size):
  z2_w1/z2_w2/z2_w4   ZeRO-2, 4 steps at 1/2/4 ranks (z2_w4: 8 steps, checkpoints at 4 and 8)
  z2_w4to2            z2_w4's step-4 checkpoint resumed on 2 ranks to step 8 (universal)
  z3_w1/z3_w2/z3_w4   ZeRO-3 (persistence threshold 0: every parameter partitioned, the
                      temperature too), 4 steps
  z3_w2_again         z3_w2 resumed on 2 ranks to step 6, every opened file recorded
  z3_killed           4 ranks, SIGKILLed while writing its step-8 checkpoint, resumed on 2
  z3_ref              z3_killed's step-4 checkpoint resumed on 2 ranks to step 8 in a fresh
                      run directory (no kill): what z3_killed must equal
  z3_w4_missing       a copy of z3_w4 without albef_rank00003.pt, resumed on 2 ranks: refused
  z2_w4_fails         z2_w4 resumed on 4 ranks, rank 3 raising at resume: the job must end
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_pretrain import REPO, command, env, keys, launch  # noqa: E402

#: momentum master + queue files + per-rank RNG: what we write (DeepSpeed's optimizer
#: partitions and module states are DeepSpeed's own, sized by it).
OURS = re.compile(r"albef_.*")


def _ds3(root: Path) -> Path:
    path = root / "zero3_fp32_no_persistent.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                "steps_per_print": 1000000}))
    return path


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):
    data, tok = synth_data
    root = tmp_path_factory.mktemp("scale")
    ds3 = _ds3(root)
    z2 = ["--set", "distributed.ds_config=ds_configs/zero2_fp32.json"]
    z3 = ["--set", f"distributed.ds_config={ds3}"]
    out = {"root": root}

    def run(name, ranks, extra, steps):
        out[name] = root / name
        launch(command(ranks, out[name], data, tok, extra + ["--set", f"train.max_steps={steps}"]),
               root / f"{name}.log")

    run("z2_w1", 1, z2, 4)
    run("z2_w2", 2, z2, 4)
    run("z2_w4", 4, z2, 8)
    out["z2_w4to2"] = root / "z2_w4to2"
    launch(command(2, out["z2_w4to2"], data, tok, z2 + [
        "--set", "train.max_steps=8", "--resume", str(out["z2_w4"] / "checkpoints" / "step_00000004")]),
        root / "z2_w4to2.log")
    run("z3_w1", 1, z3, 4)
    run("z3_w2", 2, z3, 4)
    run("z3_w4", 4, z3, 4)

    # Same-world resume with every opened file recorded.
    cmd = command(2, out["z3_w2"], data, tok, z3 + ["--set", "train.max_steps=6"])
    cmd[cmd.index("--module"):cmd.index("--module") + 2] = [str(REPO / "tests/train/record_opens.py")]
    opens = root / "opens"
    with open(root / "z3_w2_again.log", "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=dict(env(), ALBEF_OPEN_LOG=str(opens)), stdout=f,
                              stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, (root / "z3_w2_again.log").read_text()[-4000:]
    out["opens"] = {r: (root / f"opens.rank{r}").read_text().split() for r in (0, 1)}

    # 4 ranks killed while the step-8 checkpoint is being written, resumed on 2.
    out["z3_killed"] = root / "z3_killed"
    cmd = command(4, out["z3_killed"], data, tok, z3 + ["--set", "train.max_steps=8"])
    with open(root / "z3_killed.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        partial = out["z3_killed"] / "checkpoints" / "step_00000008.partial"
        deadline = time.time() + 400
        while not (partial.is_dir() and list(partial.glob("*.pt"))) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out["killed_partial_files"] = sorted(p.name for p in partial.glob("*")) if partial.is_dir() else None
    launch(command(2, out["z3_killed"], data, tok, z3 + ["--set", "train.max_steps=8", "--resume", "auto"]),
           root / "z3_killed_resumed.log")
    out["z3_ref"] = root / "z3_ref"
    launch(command(2, out["z3_ref"], data, tok, z3 + [
        "--set", "train.max_steps=8", "--resume", str(out["z3_killed"] / "checkpoints" / "step_00000004")]),
        root / "z3_ref.log")

    # A 4-rank ZeRO-3 checkpoint missing one rank's file, resumed on 2 ranks.
    missing = root / "z3_w4_missing"
    shutil.copytree(out["z3_w4"], missing)
    (missing / "checkpoints" / "step_00000004" / "albef_rank00003.pt").unlink()
    proc = subprocess.run(command(2, missing, data, tok, z3 + ["--set", "train.max_steps=6"]), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    out["z3_w4_missing"] = (missing, proc.returncode, proc.stdout + proc.stderr)

    # 4 ranks resuming z2_w4, rank 3 raising at resume; the others wait in the load's
    # collectives. Timed from the failure to the end of every process of the launch.
    shm_before = set(os.listdir("/dev/shm"))
    cmd = command(4, out["z2_w4"], data, tok, z2 + ["--set", "train.max_steps=10"])
    i = cmd.index("--module")
    cmd[i:i + 2] = [str(REPO / "tests/train/inject_error.py")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env(), INJECT_IN="resume", INJECT_RANK="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    text = proc.communicate(timeout=600)[0]
    ended = time.time()
    try:
        os.killpg(proc.pid, 0)
        left = True  # a process of the launch's session is still there
    except ProcessLookupError:
        left = False
    out["z2_w4_fails"] = {"code": proc.returncode, "text": text, "ended": ended, "left": left,
                          "new_shm": sorted(set(os.listdir("/dev/shm")) - shm_before)}
    return out


def sizes(tag_dir: Path) -> tuple[int, int]:
    """(bytes of our files, bytes of DeepSpeed's) in one checkpoint."""
    ours = sum(p.stat().st_size for p in tag_dir.iterdir() if OURS.fullmatch(p.name))
    theirs = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file() and not OURS.fullmatch(p.name))
    return ours, theirs


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_checkpoint_bytes_do_not_grow_with_the_world_size(runs, stage):
    ours = {w: sizes(runs[f"{stage}_w{w}"] / "checkpoints" / "step_00000004")[0] for w in (1, 2, 4)}
    for w in (2, 4):
        assert abs(ours[w] / ours[1] - 1) < 0.10, ours
    # What used to be written per rank (the whole fp32 momentum master) is there once.
    momentum = (runs[f"{stage}_w4"] / "checkpoints" / "step_00000004" / "albef_momentum.pt").stat().st_size
    assert momentum < 0.9 * ours[4] or stage == "z3", (momentum, ours)


def test_a_same_world_resume_opens_only_its_own_rank_files(runs):
    for rank, paths in runs["opens"].items():
        tag = [p for p in paths if "step_00000004" in p]
        assert tag, paths
        for path in tag:
            name = Path(path).name
            owner = re.search(r"rank_?(\d+)", name)
            if owner:  # a per-rank file (DeepSpeed's zero_pp_rank_N_..., our albef_rankN)
                assert int(owner.group(1)) == rank, f"rank {rank} opened {name}"
        names = {Path(p).name for p in tag}
        assert f"albef_rank{rank:05d}.pt" in names and "albef_momentum.pt" in names


def test_resume_on_fewer_ranks_continues_with_the_same_samples_per_global_step(runs):
    four = [keys(runs["z2_w4"], r) for r in range(4)]
    two = [keys(runs["z2_w4to2"], r) for r in range(2)]
    for step in range(4, 8):
        assert sorted(two[0][(step, 0)] + two[1][(step, 0)]) == sorted(k for f in four for k in f[(step, 0)]), step
    assert "universal" in (runs["root"] / "z2_w4to2.log").read_text()


def test_a_save_killed_midway_is_never_mixed_into_a_later_save(runs):
    assert runs["killed_partial_files"] is not None, "the kill did not land during the step-8 save"
    log = (runs["root"] / "z3_killed_resumed.log").read_text()
    assert re.search(r"resumed from .*step_00000004 \(world 4 -> 2", log), log[-3000:]
    tag = runs["z3_killed"] / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in tag.glob("albef_rank*")) == ["albef_rank00000.pt", "albef_rank00001.pt"]
    assert not list((runs["z3_killed"] / "checkpoints").glob("*.partial"))
    # Its momentum equals that of the same world-size history without the kill.
    from albef_ds.config import load_config
    from albef_ds.train.export import consolidate
    cfg = load_config(runs["z3_killed"] / "config.yaml")
    got = consolidate(tag, cfg).state_dict()
    want = consolidate(runs["z3_ref"] / "checkpoints" / "step_00000008", cfg).state_dict()
    momentum = [k for k in want if "_m." in k]
    assert momentum and all(torch.equal(got[k], want[k]) for k in momentum)


def test_a_zero3_checkpoint_missing_a_rank_file_is_refused_naming_it(runs):
    """It used to resume with a quarter of the momentum master zero-filled, exit 0."""
    missing, code, text = runs["z3_w4_missing"]
    assert code == 2, text[-3000:]
    assert f"{missing}/checkpoints/step_00000004/albef_rank00003.pt: missing" in text, text[-3000:]
    assert "nothing was loaded or changed" in text and not (missing / "checkpoints" / "universal").exists()


def test_a_rank_failing_at_resume_ends_the_4_rank_job_within_30_s(runs):
    out = runs["z2_w4_fails"]
    text = out["text"]
    assert out["code"] != 0 and "injected failure at resume" in text, text[-3000:]
    injected = float(re.search(r"INJECTED (\d+\.\d+)", text).group(1))
    assert out["ended"] - injected < 30, f"the job ended {out['ended'] - injected:.1f} s after the failure"
    assert "ends: another rank failed (rank 3: RuntimeError: injected failure at resume)" in text
    assert not out["left"], "a process of the job outlived it"
    # Nothing of the job left in /dev/shm: DeepSpeed's all-reduce buffers, streaming's segments.
    assert out["new_shm"] == [], out["new_shm"]
