"""A real 2-node SLURM cluster on this host for the tests in tests/slurm.

The session-scoped fixture ``slurm_cluster`` runs ``slurm/local_cluster.sh start`` the first
time a test asks for it (nothing starts when no such test is selected), yields a
:class:`SlurmCluster`, and runs ``slurm/local_cluster.sh stop`` at the end of the session.
If the cluster cannot start, the tests that use it FAIL (they are not skipped): CI must not
go green without SLURM.

State dir: ``$ALBEF_SLURM_DIR`` if set (CI sets it); when a cluster is already running
there (e.g. one a developer started by hand), it is reused and left running. Without
ALBEF_SLURM_DIR each session gets a fresh /tmp/albef-slurm-pytest-* dir (removed after a
clean stop). A cluster the fixture starts takes free ports, so concurrent sessions and a
hand-started cluster on the default ports do not collide.

Jobs see, besides SLURM's own variables: SLURM_CONF (through the submission environment,
``cluster.env``), and from the cluster's TaskProlog, on each node: TMPDIR (node-local
scratch), ALBEF_LOCAL_CACHE (node-local cache, e.g. streaming's local dir) and ALBEF_NODE_DIR.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.slurm import (SlurmCluster, daemon_pids, free_ports_env, new_state_dir, process_alive,
                                 read_env_file, run_cluster_script)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the local 2-node SLURM cluster")


@pytest.fixture(scope="session")
def slurm_cluster():
    env_dir = os.environ.get("ALBEF_SLURM_DIR")
    reuse = bool(env_dir) and run_cluster_script("status", env_dir, timeout=60).returncode == 0
    state_dir = Path(env_dir or new_state_dir())
    if not reuse:
        t0 = time.monotonic()
        proc = run_cluster_script("start", state_dir, free_ports_env())
        if proc.returncode != 0:
            pytest.fail(f"local SLURM cluster failed to start (rc {proc.returncode}) in {state_dir}:\n"
                        f"{proc.stdout}\n{proc.stderr}", pytrace=False)
        print(f"\nlocal SLURM cluster started in {time.monotonic() - t0:.1f}s ({state_dir})")
    file_env = read_env_file(state_dir / "env.sh")
    cluster = SlurmCluster(
        dir=state_dir, conf=Path(file_env["SLURM_CONF"]),
        nodes=file_env["ALBEF_SLURM_NODES"].split(), partition=file_env["ALBEF_SLURM_PARTITION"],
        env=dict(os.environ, **file_env), started_here=not reuse, pids=daemon_pids(state_dir))
    yield cluster
    if reuse:
        return
    proc = run_cluster_script("stop", state_dir, timeout=120)
    left = {n: p for n, p in cluster.pids.items() if process_alive(p)}
    if proc.returncode != 0 or left:
        pytest.fail(f"local SLURM cluster did not stop cleanly (rc {proc.returncode}, "
                    f"still alive: {left}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    if not env_dir:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synth(synth_data, tmp_path_factory):
    """(root, data, tok): the session's synth shards and vocabulary, and a folder for the
    jobs' run directories that the cluster's jobs can reach."""
    data, tok = synth_data
    root = tmp_path_factory.mktemp("slurm_runs")
    os.chmod(root, 0o755)
    return root, data, tok


@pytest.fixture(scope="session")
def uninterrupted(slurm_cluster, synth):
    """slurm/pretrain.sbatch, 2 ranks (one per node), STEPS steps, uninterrupted: the
    reference sample log of every job of tests/slurm (a global batch of 2 x MICRO)."""
    from tests.support.slurm import submit_pretrain, wait_done
    t0 = time.monotonic()
    job, run_dir = submit_pretrain(slurm_cluster, synth, "uninterrupted")
    info = wait_done(slurm_cluster, job, run_dir, timeout=300)
    return job, run_dir, info, time.monotonic() - t0
