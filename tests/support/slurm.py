"""Helpers for the tests that use the local 2-node SLURM cluster (tests/slurm/conftest.py's
``slurm_cluster`` fixture): the cluster's daemons and commands, and the jobs of
slurm/pretrain.sbatch the tests submit."""
from __future__ import annotations

import hashlib
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
DEFAULT_DIR = "/tmp/albef-slurm"

#: job states after which a job will not run again by itself
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
})


def read_env_file(path: Path) -> dict[str, str]:
    """Variables that ``env.sh`` (lines ``export NAME=VALUE``) sets."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export "):].partition("=")
            out[name] = shlex.split(value)[0] if value else ""
    return out


def run_cluster_script(cmd: str, state_dir: str | Path, extra_env: dict | None = None,
                       timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, ALBEF_SLURM_DIR=str(state_dir), **(extra_env or {}))
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), cmd], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports_env() -> dict[str, str]:
    """ALBEF_SLURMCTLD_PORT / ALBEF_SLURMD_PORT_BASE for a cluster of its own: ports free now,
    below the ephemeral range (so outgoing connections do not take them meanwhile)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000, 10)
        if all(_port_free(p) for p in (base, base + 1, base + 2)):
            return {"ALBEF_SLURMCTLD_PORT": str(base), "ALBEF_SLURMD_PORT_BASE": str(base)}
    raise RuntimeError("no free ports for a SLURM cluster in 20000-30000")


def new_state_dir(prefix: str = "albef-slurm-pytest-") -> str:
    """A fresh state dir that user munge can reach (mkdtemp makes it 0700): beside
    $ALBEF_SLURM_DIR when that is set (so .ci/run's exit trap finds and stops it), else
    under /tmp."""
    env_dir = os.environ.get("ALBEF_SLURM_DIR")
    parent = os.path.dirname(os.path.abspath(env_dir)) if env_dir else "/tmp"
    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(d, 0o755)
    return d


def daemon_pids(state_dir: str | Path) -> dict[str, int]:
    """Pids named by the cluster's pid files (munged, slurmctld, slurmd.n1, slurmd.n2)."""
    d = Path(state_dir)
    files = {"munged": d / "munge" / "munged.pid", "slurmctld": d / "run" / "slurmctld.pid"}
    files.update({p.name[:-len(".pid")]: p for p in (d / "run").glob("slurmd.*.pid")})
    out = {}
    for name, f in files.items():
        try:
            out[name] = int(f.read_text().strip())
        except (OSError, ValueError):
            pass
    return out


def process_alive(pid: int) -> bool:
    """True if pid is a live (not zombie) process. PID 1 here does not reap, so daemons that
    exited can stay as zombies: those count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class SlurmCluster:
    """What the ``slurm_cluster`` fixture yields."""

    dir: Path                       #: state dir (ALBEF_SLURM_DIR)
    conf: Path                      #: slurm.conf (SLURM_CONF)
    nodes: list[str]                #: ["n1", "n2"]
    partition: str                  #: "debug"
    env: dict[str, str]             #: os.environ + env.sh: pass to subprocess for sbatch etc.
    started_here: bool = True       #: False when an already running cluster was reused
    pids: dict[str, int] = field(default_factory=dict)  #: daemon pids at start

    def node_dir(self, node: str) -> Path:
        return self.dir / "node" / node

    def node_tmp(self, node: str) -> Path:
        """TMPDIR of jobs' tasks on ``node``."""
        return self.node_dir(node) / "tmp"

    def node_cache(self, node: str) -> Path:
        """ALBEF_LOCAL_CACHE of jobs' tasks on ``node``."""
        return self.node_dir(node) / "cache"

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """Run a command (``sbatch``, ``scontrol``...) against this cluster; text output."""
        env = dict(self.env, **kw.pop("env", {}))
        proc = subprocess.run(list(args), env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> rc {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sbatch(self, *args: str, **kw) -> str:
        """``sbatch --parsable ARGS``; returns the job id (for an array, the array job id)."""
        out = self.run("sbatch", "--parsable", *args, **kw).stdout.strip()
        return out.split(";")[0]

    def jobs_info(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o JOB`` as dicts, one per record (an array job gives one per
        task). Completed jobs stay visible for MinJobAge=300 s. Values with spaces (Command,
        Comment...) are cut at the first space."""
        records = []
        for line in self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.splitlines():
            info = {}
            for tok in line.split():
                k, sep, v = tok.partition("=")
                if sep:
                    info[k] = v
            if info:
                records.append(info)
        return records

    def job_info(self, job_id: str) -> dict[str, str]:
        """The first record of :meth:`jobs_info`."""
        return self.jobs_info(job_id)[0]

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id)["JobState"]

    def wait_job(self, job_id: str, states=FINAL_STATES, timeout: float = 60,
                 poll: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of ``states``; return its info. AssertionError on
        timeout (with the job's record and slurmctld's log tail)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout}s: "
                                     f"{info}\n{self.log_tail()}")
            time.sleep(poll)

    def start_requeued_now(self, job_id: str, timeout: float = 60) -> None:
        """Skip SLURM's ~120 s requeue delay. Only once both nodes are idle again: a job
        started while its previous run still completes is killed by slurmctld ("Job
        credential revoked") and ends FAILED."""
        wait_until(lambda: set(self.run("sinfo", "-h", "-o", "%T").stdout.split()) == {"idle"},
                   timeout=timeout, what=f"nodes idle after requeueing job {job_id}")
        # slurmd drops the revoked credential of the previous run shortly after the node turns
        # idle; under load a start within that window was still refused (seen here).
        time.sleep(5)
        self.run("scontrol", "update", f"jobid={job_id}", "starttime=now")

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for f in [self.dir / "log" / "slurmctld.log", *sorted((self.dir / "log").glob("slurmd.*.log"))]:
            if f.exists():
                parts.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def wait_until(pred, timeout: float, poll: float = 0.5, what: str = "condition"):
    """Poll ``pred()`` until truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------- jobs of slurm/pretrain.sbatch

#: the jobs' run: steps, micro-batch per rank, checkpoint interval (tests/slurm)
STEPS = 16
MICRO = 8
CKPT_EVERY = 4


def job_env(run_dir: Path, data: Path, tok: Path) -> dict:
    bin_dir = os.path.dirname(sys.executable)
    extra = [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}",
             f"train.max_steps={STEPS}", f"train.micro_batch_size={MICRO}", "train.lr=1e-3",
             "train.warmup_steps=2", "model.vision_depth=2", "model.text_depth=2", "model.fusion_layer=1",
             "logging.log_every=1", f"checkpoint.every_steps={CKPT_EVERY}", "checkpoint.keep_last=10",
             "logging.log_sample_keys=true", "logging.progress_bar=false", "logging.tensorboard=false"]
    # DeepSpeed JIT-builds its CPU shm op (~60 s on 2 cores): one build dir per environment
    # (inside it when writable: CI's throw-away venv takes it along), so that builds for
    # other environments on this host (same ~/.cache path, other flags) do not invalidate ours.
    if os.access(sys.prefix, os.W_OK):
        ext = os.path.join(sys.prefix, "var", "albef-torch-extensions")
    else:
        ext = f"/tmp/albef-torch-ext-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"
    return {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "DEVICE": "cpu", "CONFIG": "tiny", "DS_CONFIG": "ds_configs/zero2_fp32.json",
        "RUN_DIR": str(run_dir), "EXTRA_ARGS": " ".join(f"--set {e}" for e in extra),
        "ALBEF_DS": f"{REPO / 'tests' / 'slurm' / 'private_shm.sh'} {bin_dir}/albef-ds",
        "PYTHON": sys.executable, "TORCH_EXTENSIONS_DIR": ext,
    }


def job_log(run_dir: Path, job: str) -> str:
    f = run_dir / "logs" / f"pretrain-{job}.log"
    return f.read_text(errors="replace") if f.exists() else ""


def wait_done(cluster, job: str, run_dir: Path, timeout: float = 240) -> dict:
    info = cluster.wait_job(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED", (info, job_log(run_dir, job)[-5000:])
    return info


def submit_pretrain(cluster, synth, name: str, **variables) -> tuple[str, Path]:
    """slurm/pretrain.sbatch on both nodes, one rank each, into ``synth``'s root / ``name``;
    ``variables``: more of the script's variables (e.g. ENGINE="fsdp2")."""
    root, data, tok = synth
    run_dir = root / name
    run_dir.mkdir()
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--job-name=albef-{name}", f"--output={run_dir}/slurm-%j.out",
                         str(REPO / "slurm" / "pretrain.sbatch"),
                         env={**job_env(run_dir, data, tok), **variables}, cwd=root)
    return job, run_dir
