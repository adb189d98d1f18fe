"""Launching the programs as a user does: ``python -m albef_ds``, the deepspeed launcher,
``albef-data``, the test drivers. The one place that builds their command lines and
environments (every launch also counts in tests/support/launch_count.py).

:func:`in_process` runs ``albef-ds ARGV`` on one rank in the pytest process: the same code
path as ``python -m albef_ds`` (``albef_ds.cli.main``), without paying a new interpreter's
imports and engine set-up; what it changes in the process (signal handlers, the launch
variables, torch's threads) is put back."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Optional

from albef_ds.distributed import free_port

REPO = Path(__file__).resolve().parents[2]

#: what a launcher exports; the library's init_distributed writes them into os.environ too,
#: and a launched process must not inherit them from this one
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: pretraining steps of the short demo shared by the end-to-end tests (the ``demo`` fixture)
DEMO_STEPS = 300


def env(threads: int = 1, **extra) -> dict:
    """This process's environment without the launch variables, with the repository first
    on PYTHONPATH (the tests' drivers import ``tests.support``; a worktree's package wins
    over an installed one) and ``threads`` OpenMP threads per process."""
    out = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    path = os.pathsep.join([str(REPO)] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
    out.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONPATH=path,
               TOKENIZERS_PARALLELISM="false")
    out.update({k: str(v) for k, v in extra.items()})
    return out


def albef_command(ranks: int, args: list[str], module: str = "albef_ds", launcher: str = "direct") -> list[str]:
    """``python -m MODULE ARGS`` on one rank; on several under ``launcher``: "direct"
    (tests/support/drivers/ranks.py: the variables a launcher gives each rank, without the
    deepspeed launcher's two extra interpreters: 12 s instead of 17 s for a 20-step 2-rank
    run) or "deepspeed" (the launcher users run: the tests of how a job ends use it).
    ``module``: albef_ds, or a driver in tests.support.drivers that wraps it."""
    if ranks == 1:
        return [sys.executable, "-m", module, *args]
    if launcher == "direct":
        return [sys.executable, "-m", "tests.support.drivers.ranks", str(ranks), str(free_port()), module, *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), "--module", module, *args]


def call(cmd: list[str], log: Optional[Path] = None, ok: bool = True, cwd: Path = REPO, timeout: int = 600,
         **extra_env) -> tuple[int, str]:
    """Run ``cmd`` (stdout and stderr together, into ``log`` when given: as a SLURM job's
    output is a file); (exit status, output). ``ok``: a non-zero status fails the test."""
    environment = env(**extra_env)
    if log is not None:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=cwd, env=environment, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        text = Path(log).read_text(errors="replace")
    else:
        proc = subprocess.run(cmd, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        text = proc.stdout
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{text[-5000:]}")
    return proc.returncode, text


@contextlib.contextmanager
def _process_state_kept():
    """What a run changes in the process that the next test must not see: signal handlers
    (StopFlag), the launch variables (init_distributed exports them), torch's threads."""
    import torch
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    launch = {name: os.environ.get(name) for name in LAUNCH_VARS}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for name, value in launch.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(threads)


def in_process(argv: list[str], log: Optional[Path] = None, cwd: Optional[Path] = None,
               program: str = "albef-ds") -> tuple[int, str]:
    """``PROGRAM ARGV`` (albef-ds on one rank, or albef-data) in this process: (exit status,
    what it printed on stdout and stderr), also written to ``log`` when given. torch runs
    one intra-op thread meanwhile: beside the other pytest-xdist worker, 2 threads per
    process oversubscribe the 2 cores (a 2-minute demo took over 7)."""
    import torch

    if program == "albef-ds":
        from albef_ds.cli import main
    else:
        from data_tools.cli import main
    out = io.StringIO()
    with _process_state_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
            (contextlib.chdir(cwd) if cwd else contextlib.nullcontext()):
        torch.set_num_threads(1)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Exception:  # what the interpreter prints for an uncaught error, and its status
            traceback.print_exc()
            code = 1
    text = out.getvalue()
    if log is not None:
        Path(log).write_text(text)
    return code, text


def run_albef(argv: list[str]) -> str:
    """``albef-ds ARGV`` in this process (:func:`in_process`) that must succeed: what it
    printed."""
    code, text = in_process(argv)
    assert code == 0, text[-8000:]
    return text


def synth_tasks(out: Path, num_train: int, num_val: int, num_test: int) -> Path:
    """``albef-data synth-tasks`` into ``out`` (the downstream tasks' synthetic JSON)."""
    code, text = in_process(["synth-tasks", "--out", out, "--num-train", num_train, "--num-val", num_val,
                             "--num-test", num_test, "--no-progress"], program="albef-data")
    assert code == 0, text[-3000:]
    return out
