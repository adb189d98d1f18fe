"""slurm/pretrain.sbatch on a node shared with other jobs of the same user (the local
cluster, CPU variables; no private /dev/shm here: the jobs share the node's, as on a real
shared node).

  a, b       the same 1-rank job twice at once on n1 (the global batch of the
             uninterrupted 2-rank job of conftest.py, on one rank): both finish with its
             samples, step by step;
             neither job's shared-memory handling touches the other's (the old pre-step ran
             streaming's host-wide clean-up and unlinked the first job's live segments);
             distinct master ports (a free port picked on the node, not the job id)
  cpus       --cpus-per-task=2: the training step gets 2 CPUs per task (srun no longer
             inherits it from the allocation)
  killed     a job SIGKILLed by SLURM (its streaming segments stay in /dev/shm), then the
             same run again beside a live job of another run: the rerun reclaims the
             killed job's segments and leaves the live job's alone
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.support.runs import keys
from tests.support.slurm import MICRO, REPO, job_env, job_log, wait_done, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(900)]


def _submit_on_n1(cluster, synth, name: str, cpus: int = 1, extra: str = "", micro: int = MICRO) -> tuple[str, Path]:
    root, data, tok = synth
    run_dir = root / name
    run_dir.mkdir(exist_ok=True)
    env = job_env(run_dir, data, tok)
    env["EXTRA_ARGS"] += extra + f" --set train.micro_batch_size={micro}"
    env["ALBEF_DS"] = f"{Path(sys.executable).parent}/albef-ds"  # the node's own /dev/shm
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=1", "--nodelist=n1", "--gpus-per-node=0",
                         f"--cpus-per-task={cpus}", f"--job-name=albef-{name}", f"--output={run_dir}/slurm-%j.out",
                         str(REPO / "slurm" / "pretrain.sbatch"), env=env, cwd=root)
    return job, run_dir


def _port(text: str) -> int:
    return int(re.search(r"master n1:(\d+)", text).group(1))


def test_two_jobs_sharing_a_node_both_finish_with_the_uninterrupted_samples(slurm_cluster, synth, uninterrupted):
    c = slurm_cluster
    reference = uninterrupted[1]
    job_a, run_a = _submit_on_n1(c, synth, "a", micro=2 * MICRO)
    # b starts once a's loader holds its shared memory (a's record is written then)
    wait_until(lambda: any((run_a / ".shm").glob("*.json")) or c.job_state(job_a) not in
               ("PENDING", "CONFIGURING", "RUNNING"), timeout=300, poll=0.5, what="job a's data loader")
    job_b, run_b = _submit_on_n1(c, synth, "b", micro=2 * MICRO)
    for job, run in ((job_a, run_a), (job_b, run_b)):
        wait_done(c, job, run, timeout=400)
        steps = keys(run, 0)
        assert sorted(steps) == sorted(keys(reference, 0)), f"job {job}: other steps than the 2-rank run"
        for sk, got in steps.items():  # the same global samples each step, on one rank
            assert sorted(got) == sorted(keys(reference, 0)[sk] + keys(reference, 1)[sk]), (job, sk)
    text_a, text_b = job_log(run_a, job_a), job_log(run_b, job_b)
    assert _port(text_a) != _port(text_b), "two jobs on one node rendezvoused on one port"
    assert "Traceback" not in text_a + text_b, (text_a + text_b)[-4000:]


def test_the_training_step_gets_the_jobs_cpus_per_task(slurm_cluster, synth):
    c = slurm_cluster
    job, run_dir = _submit_on_n1(c, synth, "cpus", cpus=2)
    seen = {}

    def step_running():
        out = c.run("scontrol", "show", "step", f"{job}.0", check=False).stdout
        found = re.search(r"\bCPUs=(\d+) Tasks=(\d+)", out)
        if found:
            seen["cpus"], seen["tasks"] = int(found.group(1)), int(found.group(2))
        state = c.job_state(job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETED"), (state, job_log(run_dir, job)[-3000:])
        return bool(seen) or state == "COMPLETED"
    wait_until(step_running, timeout=300, poll=0.1, what="the training step")
    assert seen == {"cpus": 2, "tasks": 1}, seen
    assert "1 task(s) x 2 CPU(s)" in job_log(run_dir, job)
    wait_done(c, job, run_dir, timeout=400)


def _record(cluster, job: str, run_dir: Path) -> dict:
    import json
    wait_until(lambda: any((run_dir / ".shm").glob("*.json")), timeout=300, poll=0.5,
               what=f"job {job}'s data loader")
    return json.loads(next((run_dir / ".shm").glob("*.json")).read_text())


def test_a_killed_jobs_segments_are_reclaimed_by_its_rerun_and_a_live_jobs_are_not(slurm_cluster, synth):
    from albef_ds.data.shm import SHM_DIR
    c = slurm_cluster
    long = " --set train.max_steps=2000 --set checkpoint.every_steps=2000"
    job_k, run_k = _submit_on_n1(c, synth, "killed", extra=long)
    record = _record(c, job_k, run_k)
    killed_prefix = record["prefix"]
    # A hard kill of the whole task (the OOM killer, a node agent): its process group, the
    # resource tracker included (a surviving tracker would unlink the segments itself).
    os.killpg(os.getpgid(record["pid"]), signal.SIGKILL)
    c.run("scancel", job_k)
    c.wait_job(job_k, timeout=120)
    left = sorted(p.name for p in SHM_DIR.glob(f"{killed_prefix:06}_*"))
    assert left, "the killed job left no shared memory: nothing to test"
    job_l, run_l = _submit_on_n1(c, synth, "live", extra=long)
    live = sorted(p.name for p in SHM_DIR.glob(f"{_record(c, job_l, run_l)['prefix']:06}_*"))
    try:
        job_r, _ = _submit_on_n1(c, synth, "killed")  # the same run again, 16 steps
        wait_done(c, job_r, run_k, timeout=400)
        assert not any((SHM_DIR / n).exists() for n in left), "the killed job's segments are still there"
        assert c.job_state(job_l) == "RUNNING", job_log(run_l, job_l)[-3000:]
        assert all((SHM_DIR / n).exists() for n in live), "the live job's segments were touched"
    finally:
        c.run("scancel", job_l, check=False)
        c.wait_job(job_l, timeout=180)  # it saves and exits on SIGTERM: nothing left running
