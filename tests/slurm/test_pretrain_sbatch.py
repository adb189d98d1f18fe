"""slurm/pretrain.sbatch (the real script, CPU variables) on the local 2-node cluster.

  uninterrupted  2 ranks, one per node, N steps: COMPLETED, a 2-rank world, all steps, DONE.
  usr1           the time-limit warning (SIGUSR1 to the batch shell): the ranks checkpoint
                 and exit 3, the script requeues the job, the rerun resumes and finishes.
  sigterm        an external `scontrol requeue` (SIGTERM to every step): the ranks save
                 within KillWait, SLURM requeues, the rerun resumes and finishes.
Both preempted jobs consume exactly the sample keys of the uninterrupted one (per rank,
step and micro-step): 0 repeated, 0 skipped.

The cluster's two "nodes" share this host and so one /dev/shm: each rank runs through
tests/slurm/private_shm.sh (its own /dev/shm, as on separate hosts; see that file).
"""
from __future__ import annotations

import collections
import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.runs import keys
from tests.support.slurm import (CKPT_EVERY, MICRO, REPO, STEPS, job_env, job_log, submit_pretrain, wait_done,
                                 wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(600)]

KILL_WAIT = 30  # the local cluster's KillWait (asserted in test_local_cluster)


def _steps_logged(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _raw_keys(run_dir: Path, rank: int) -> list:
    rows = [json.loads(line) for line in (run_dir / f"sample_keys_rank{rank}.jsonl").read_text().splitlines()]
    return [((r["step"], r["micro"]), r["keys"]) for r in rows]


def _stamp(text: str, pattern: str) -> float:
    m = re.search(r"\[pretrain (\S+)Z\] " + pattern, text)
    assert m, (pattern, text[-3000:])
    return datetime.fromisoformat(m.group(1)).timestamp()


def _wait_for_progress(cluster, job: str, run_dir: Path, steps: int):
    """A complete checkpoint exists and at least `steps` steps were logged."""
    def ready():
        state = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, job_log(run_dir, job)[-3000:])
        return (run_dir / "checkpoints" / "latest").exists() and _steps_logged(run_dir) >= steps
    wait_until(ready, timeout=240, poll=0.5, what=f"a checkpoint and {steps} steps")


def _restart(cluster, job: str, run_dir: Path):
    """The job is back to PENDING (requeued, Restarts=1): start it now (skips ~120 s)."""
    info = cluster.wait_job(job, states={"PENDING"}, timeout=90)
    assert int(info["Restarts"]) == 1, (info, job_log(run_dir, job)[-3000:])
    cluster.start_requeued_now(job)


def _assert_same_samples(run_dir: Path, ref_dir: Path) -> dict:
    """Per rank: every (step, micro) consumed the reference's keys; the multiset of all keys
    equals the reference's; and no (step, micro) ran twice (the stop checkpoint was taken at
    the step the ranks stopped at, so nothing was recomputed)."""
    out = {}
    for rank in (0, 1):
        raw = _raw_keys(run_dir, rank)
        got, ref = keys(run_dir, rank), keys(ref_dir, rank)
        assert sorted(got) == sorted(ref) == [(s, 0) for s in range(STEPS)], (rank, sorted(got))
        diff = [sk for sk in ref if got[sk] != ref[sk]]
        assert not diff, (rank, diff[:5])
        repeated = len(raw) - len(got)
        assert repeated == 0, f"rank {rank}: {repeated} (step, micro) ran twice"
        out[rank] = repeated
    everything = collections.Counter(k for r in (0, 1) for ks in keys(run_dir, r).values() for k in ks)
    reference = collections.Counter(k for r in (0, 1) for ks in keys(ref_dir, r).values() for k in ks)
    assert everything == reference
    assert sum(everything.values()) == len(everything) == STEPS * 2 * MICRO  # 0 repeated, 0 skipped
    return out


def _assert_finished(run_dir: Path, job: str, restarts: int):
    text = job_log(run_dir, job)
    assert (run_dir / "DONE").read_text() == str(STEPS)
    metrics = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(metrics)) == list(range(1, STEPS + 1)), metrics
    assert re.findall(r"\] job \d+ restart (\d+) on n\[1-2\]: 2 node\(s\) x 1 task", text) == \
        [str(i) for i in range(restarts + 1)], text[-3000:]
    assert text.count("world size 2 on 2 node(s) (srun)") == restarts + 1, text[-3000:]
    assert "final step reached (16): done" in text
    return text


def test_two_ranks_one_per_node_complete_all_steps(uninterrupted):
    job, run_dir, info, elapsed = uninterrupted
    assert info["NodeList"] == "n[1-2]" and int(info["Restarts"]) == 0, info
    text = _assert_finished(run_dir, job, restarts=0)
    assert "scontrol requeue" not in text
    for rank in (0, 1):
        assert sorted(keys(run_dir, rank)) == [(s, 0) for s in range(STEPS)]
    # where each rank ran: the per-node TMPDIR holds its streaming file locks
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    print(f"uninterrupted {STEPS}-step job: {elapsed:.1f}s")


def test_the_fsdp2_engine_runs_under_the_same_script(slurm_cluster, synth, uninterrupted):
    """ENGINE=fsdp2: the same job on the FSDP2 engine completes every step, each rank
    writing its own DCP shards, on the samples of the DeepSpeed job."""
    job, run_dir = submit_pretrain(slurm_cluster, synth, "fsdp2", ENGINE="fsdp2")
    wait_done(slurm_cluster, job, run_dir, timeout=300)
    text = _assert_finished(run_dir, job, restarts=0)
    assert "engine fsdp2" in text, text[-3000:]
    tag = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in tag.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for rank in (0, 1):
        assert keys(run_dir, rank) == keys(uninterrupted[1], rank)


def test_usr1_warning_checkpoints_requeues_and_resumes(slurm_cluster, synth, uninterrupted):
    """Submitted with slurm/submit-pretrain.sh (pretrain.sbatch plus an eval.sbatch job that
    waits for it with afterok: through the requeue, it runs once training completed)."""
    c = slurm_cluster
    root, data, tok = synth
    run_dir = root / "usr1"
    env = job_env(run_dir, data, tok)
    pretrain_args = env.pop("EXTRA_ARGS").split()
    for name in ("RUN_DIR", "CONFIG", "DS_CONFIG", "DEVICE"):
        env.pop(name)
    t0 = time.monotonic()
    sub = c.run("bash", str(REPO / "slurm" / "submit-pretrain.sh"), "--run-dir", str(run_dir), "--config", "tiny",
                "--ds-config", "ds_configs/zero2_fp32.json", "--nodes", "2", "--gpus-per-node", "1",
                "--cpus-per-task", "1", "--cpu", "--eval", str(data / "test.json"), "--", *pretrain_args,
                env=env, cwd=root)
    job = re.search(r"^PRETRAIN_JOB_ID=(\d+)$", sub.stdout, re.M).group(1)
    eval_job = re.search(r"^EVAL_JOB_ID=(\d+)$", sub.stdout, re.M).group(1)
    assert c.job_info(eval_job)["Dependency"].startswith(f"afterok:{job}")
    _wait_for_progress(c, job, run_dir, steps=CKPT_EVERY + 2)
    c.run("scancel", "--signal=USR1", "--batch", job)
    _restart(c, job, run_dir)
    assert c.job_state(eval_job) == "PENDING"  # the requeue did not release the dependency
    info = wait_done(c, job, run_dir)
    assert int(info["Restarts"]) == 1, info
    text = _assert_finished(run_dir, job, restarts=1)
    stop = re.search(r"stop requested \((?:SIGUSR1|another rank)\): checkpoint at step (\d+) committed", text)
    assert stop, text[-5000:]
    stop_step = int(stop.group(1))
    assert CKPT_EVERY + 2 <= stop_step < STEPS
    assert "training step ended: exit 3" in text and f"scontrol requeue {job}" in text, text[-3000:]
    assert re.search(rf"resumed from \S+step_{stop_step:08d} at step {stop_step}\b", text), text[-3000:]
    assert "Traceback" not in text, text[-5000:]  # e.g. resource_tracker KeyErrors at the stop
    _assert_same_samples(run_dir, uninterrupted[1])
    t_train = time.monotonic() - t0
    eval_info = c.wait_job(eval_job, timeout=120)
    eval_log = (run_dir / "logs" / f"eval-{eval_job}.out").read_text(errors="replace")
    assert eval_info["JobState"] == "COMPLETED", (eval_info, eval_log[-3000:])
    result = json.loads((run_dir / "eval-test" / "retrieval.json").read_text())
    assert "txt_r1" in json.dumps(result), result
    print(f"USR1 at step {stop_step}: preempted + requeued + resumed job took {t_train:.1f}s; "
          f"eval job after it: {time.monotonic() - t0 - t_train:.1f}s more")


def test_external_requeue_sigterm_saves_within_killwait_and_resumes(slurm_cluster, synth, uninterrupted):
    c = slurm_cluster
    t0 = time.monotonic()
    job, run_dir = submit_pretrain(c, synth, "sigterm")
    _wait_for_progress(c, job, run_dir, steps=CKPT_EVERY + 2)
    t_requeue = time.time()
    c.run("scontrol", "requeue", job)
    _restart(c, job, run_dir)
    info = wait_done(c, job, run_dir)
    assert int(info["Restarts"]) == 1, info
    text = _assert_finished(run_dir, job, restarts=1)
    stop = re.search(r"stop requested \((?:SIGTERM|another rank)\): checkpoint at step (\d+) committed", text)
    assert stop, text[-5000:]
    stop_step = int(stop.group(1))
    # the ranks exited by themselves (3), not by SLURM's SIGKILL after KillWait
    assert "training step ended: exit 3" in text, text[-3000:]
    assert "not requeueing from here" in text
    t_term = _stamp(text, "SIGTERM")  # when the batch shell's trap ran
    t_ended = _stamp(text, "training step ended")
    tag_dir = run_dir / "checkpoints" / f"step_{stop_step:08d}"
    mtimes = [f.stat().st_mtime for f in tag_dir.rglob("*") if f.is_file()]
    t_saved = (tag_dir / "albef_meta.json").stat().st_mtime  # written last: the commit
    assert t_requeue - 1 <= t_saved <= t_ended + 1
    # from the requeue command (SIGTERM follows it) to the ranks' exit: inside KillWait
    assert t_ended - t_requeue < KILL_WAIT, (t_requeue, t_term, t_ended)
    assert re.search(rf"resumed from \S+step_{stop_step:08d} at step {stop_step}\b", text), text[-3000:]
    _assert_same_samples(run_dir, uninterrupted[1])
    print(f"SIGTERM (external requeue) at step {stop_step}: after `scontrol requeue`, the batch shell's "
          f"trap ran at +{t_term - t_requeue:.1f}s, the checkpoint was committed at +{t_saved - t_requeue:.1f}s "
          f"(its files written over {t_saved - min(mtimes):.2f}s), the ranks had exited at "
          f"+{t_ended - t_requeue:.1f}s (KillWait {KILL_WAIT}s); whole job {time.monotonic() - t0:.1f}s")


def test_deepspeed_launcher_variant_usr1_requeues_and_resumes(slurm_cluster, synth, uninterrupted):
    """slurm/pretrain-deepspeed.sbatch: 2 CPU ranks on one node under the `deepspeed`
    launcher (which forwards SIGTERM, not SIGUSR1); the USR1 warning ends in a checkpoint,
    a requeue and a resumed run that consumes the uninterrupted run's samples."""
    c = slurm_cluster
    root, data, tok = synth
    run_dir = root / "deepspeed"
    run_dir.mkdir()
    env = job_env(run_dir, data, tok)
    env.pop("ALBEF_DS")
    env["NUM_RANKS"] = "2"
    t0 = time.monotonic()
    job = c.sbatch("--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--gpus-per-node=0",
                   f"--output={run_dir}/slurm-%j.out", str(REPO / "slurm" / "pretrain-deepspeed.sbatch"),
                   env=env, cwd=root)
    _wait_for_progress(c, job, run_dir, steps=CKPT_EVERY + 2)
    c.run("scancel", "--signal=USR1", "--batch", job)
    _restart(c, job, run_dir)
    info = wait_done(c, job, run_dir)
    assert int(info["Restarts"]) == 1, info
    text = job_log(run_dir, job)
    assert (run_dir / "DONE").read_text() == str(STEPS)
    assert text.count("world size 2 on 1 node(s) (deepspeed/torchrun)") == 2, text[-3000:]
    stop = re.search(r"stop requested \((?:SIGTERM|another rank)\): checkpoint at step (\d+) committed", text)
    assert stop, text[-5000:]
    stop_step = int(stop.group(1))
    assert f"scontrol requeue {job}" in text and "final step reached (16): done" in text
    assert re.search(rf"resumed from \S+step_{stop_step:08d} at step {stop_step}\b", text), text[-3000:]
    _assert_same_samples(run_dir, uninterrupted[1])
    print(f"deepspeed launcher, USR1 at step {stop_step}: job took {time.monotonic() - t0:.1f}s")
