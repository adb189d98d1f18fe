"""The local 2-node SLURM cluster (slurm/local_cluster.sh) and the SLURM mechanics that the
sbatch scripts rely on: 2 nodes x 1 task through srun, the master host, per-node scratch,
and the USR1 -> trap -> `scontrol requeue` -> restart path (plain bash, no training)."""
from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.support.slurm import (daemon_pids, free_ports_env, new_state_dir, process_alive,
                         read_env_file, run_cluster_script, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(180)]


def test_both_nodes_idle(slurm_cluster):
    c = slurm_cluster
    assert c.nodes == ["n1", "n2"]
    out = c.run("sinfo", "-h", "-N", "-o", "%N %t %c %P").stdout.split("\n")
    rows = sorted(line.split() for line in out if line.strip())
    assert rows == [["n1", "idle", rows[0][2], "debug*"], ["n2", "idle", rows[1][2], "debug*"]]
    assert all(int(r[2]) >= 2 for r in rows), rows  # a few CPUs per task fit on each node
    env = read_env_file(c.dir / "env.sh")
    assert env["SLURM_CONF"] == str(c.conf) and c.conf.is_file()
    for n in c.nodes:
        assert c.node_tmp(n).is_dir() and c.node_cache(n).is_dir()
        assert env[f"ALBEF_SLURM_{n.upper()}_TMPDIR"] == str(c.node_tmp(n))
        assert env[f"ALBEF_SLURM_{n.upper()}_CACHE"] == str(c.node_cache(n))
    conf = c.conf.read_text()
    for setting in ("JobRequeue=1", "KillWait=30", "ReturnToService=2"):
        assert re.search(rf"^{setting}$", conf, re.M), setting


def test_two_node_job_one_task_per_node(slurm_cluster, tmp_path):
    c = slurm_cluster
    log = tmp_path / "job.log"
    script = tmp_path / "two_nodes.sbatch"
    script.write_text("""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
echo "batch node=$SLURMD_NODENAME tmpdir=$TMPDIR"
echo "master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
srun bash -c 'echo "task procid=$SLURM_PROCID node=$SLURMD_NODENAME localid=$SLURM_LOCALID \
ntasks=$SLURM_NTASKS tmpdir=$TMPDIR cache=$ALBEF_LOCAL_CACHE"'
""")
    t0 = time.monotonic()
    proc = c.run("sbatch", "--wait", f"--output={log}", str(script), timeout=120)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert proc.returncode == 0, text
    tasks = sorted(re.findall(r"task procid=(\d) node=(\S+) localid=(\d) ntasks=(\d) "
                              r"tmpdir=(\S+) cache=(\S+)", text))
    assert tasks == [
        ("0", "n1", "0", "2", str(c.node_tmp("n1")), str(c.node_cache("n1"))),
        ("1", "n2", "0", "2", str(c.node_tmp("n2")), str(c.node_cache("n2"))),
    ], text
    assert "master=n1\n" in text, text
    assert f"batch node=n1 tmpdir={c.node_tmp('n1')}\n" in text, text
    print(f"2-node sbatch --wait took {elapsed:.1f}s")


def test_usr1_trap_then_requeue_restarts_job(slurm_cluster, tmp_path):
    """SIGUSR1 to the batch shell only (scancel --signal=USR1 --batch) runs the trap while the
    shell waits on `srun &`; the script then requeues itself; the rerun sees
    SLURM_RESTART_COUNT=1 and appends to the same log."""
    c = slurm_cluster
    log = tmp_path / "preempt.log"
    marker = tmp_path / "usr1.marker"
    script = tmp_path / "preempt.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --requeue
echo "run restart_count=${{SLURM_RESTART_COUNT:-0}} job=$SLURM_JOB_ID"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then
    srun bash -c 'echo "second run procid=$SLURM_PROCID node=$SLURMD_NODENAME"'
    echo "second run done"
    exit 0
fi
got_usr1=0
trap 'got_usr1=1; echo "usr1 job=$SLURM_JOB_ID" > {marker}; echo "trap USR1"' USR1
srun bash -c 'trap "echo rank $SLURM_PROCID got TERM; kill \\$s 2>/dev/null; exit 143" TERM
              echo "ready procid=$SLURM_PROCID"; sleep 120 & s=$!; wait $s' &
srun_pid=$!
wait $srun_pid
echo "wait returned got_usr1=$got_usr1"
if [ "$got_usr1" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    wait $srun_pid
fi
exit 0
""")
    t0 = time.monotonic()
    job = c.sbatch(f"--output={log}", str(script))
    # the step is running on both nodes
    wait_until(lambda: log.exists() and log.read_text().count("ready procid=") == 2,
               timeout=30, what="both ranks ready")
    c.run("scancel", "--signal=USR1", "--batch", job)
    wait_until(marker.exists, timeout=20, what="USR1 marker from the trap")
    assert marker.read_text().strip() == f"usr1 job={job}"
    # requeued: back to PENDING with a begin time ~2 min ahead; skip that delay
    info = c.wait_job(job, states={"PENDING"}, timeout=40)
    assert int(info["Restarts"]) == 1, info
    c.start_requeued_now(job)
    info = c.wait_job(job, timeout=60)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert int(info["Restarts"]) == 1
    runs = re.findall(r"run restart_count=(\d) job=(\d+)", text)
    assert runs == [("0", job), ("1", job)], text
    assert "trap USR1" in text and "wait returned got_usr1=1" in text, text
    assert sorted(re.findall(r"second run procid=(\d) node=(\S+)", text)) == [("0", "n1"), ("1", "n2")], text
    print(f"USR1 -> requeue -> restart cycle took {elapsed:.1f}s")


def test_start_stop_leaves_no_daemon():
    """A second, throw-away cluster (own dir and ports, CPUs above what slurmd detects):
    start -> idle -> stop -> none of its daemons (by the pids in its pid files) alive."""
    state_dir = new_state_dir("albef-slurm-lifecycle-")
    env = {**free_ports_env(), "ALBEF_SLURM_CPUS": "4"}
    try:
        t0 = time.monotonic()
        proc = run_cluster_script("start", state_dir, env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        pids = daemon_pids(state_dir)
        assert sorted(pids) == ["munged", "slurmctld", "slurmd.n1", "slurmd.n2"], pids
        assert all(process_alive(p) for p in pids.values()), pids
        st = run_cluster_script("status", state_dir, env)
        assert st.returncode == 0, st.stdout + st.stderr
        assert re.search(r"^n1 debug\* idle 4$", st.stdout, re.M), st.stdout  # not drained
        proc = run_cluster_script("stop", state_dir, env)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stdout + proc.stderr
        left = {n: p for n, p in pids.items() if process_alive(p)}
        assert not left, f"still running after stop: {left}"
        assert run_cluster_script("status", state_dir, env).returncode == 3
        # stop twice is fine
        assert run_cluster_script("stop", state_dir, env).returncode == 0
        print(f"start+stop took {elapsed:.1f}s")
    finally:
        run_cluster_script("stop", state_dir, env)
        shutil.rmtree(state_dir, ignore_errors=True)
