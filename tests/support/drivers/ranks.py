"""``python -m tests.support.drivers.ranks N PORT MODULE ARGS...``: N ranks of
``python -m MODULE ARGS`` on this host, each with the variables torchrun (without its agent
store) gives a rank: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

For the session's memoised training runs (tests/support/runs.py): the deepspeed launcher
costs two more interpreters that import torch and DeepSpeed (its runner and its launch
script) before any rank starts, and polls its ranks once a second at the end. What a rank
does is the same either way (the library reads the same variables); the launcher itself is
exercised by the tests that are about it (tests/train/test_failure_paths.py, the packaging
and SLURM tests).

The ranks write to this process's stdout and stderr. The first rank to exit non-zero ends
the others (SIGTERM, SIGKILL 10 s later), as the launchers do; that status is this one's.
"""
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    world, port, module, args = int(argv[0]), argv[1], argv[2], argv[3:]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-u", "-m", module, *args], env=env))
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and status == 0:
            status = failed[0]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return status or next((p.returncode for p in procs if p.returncode != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
