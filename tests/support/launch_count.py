"""How many processes a test session starts, by kind: every ``subprocess.Popen`` made in
the pytest process is counted (the launches the suite pays for; a launcher's own ranks are
counted as that launcher's rank count). Printed at the end of the session; written as JSON
to ``$ALBEF_TEST_LAUNCHES`` when set (docs/testing.md compares sessions)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter

COUNTS: Counter = Counter()
#: processes the launches started: a deepspeed launcher with N ranks counts N + 2, the direct
#: spawner (tests/support/drivers/ranks.py) N + 1
PROCESSES: Counter = Counter()
_original_init = subprocess.Popen.__init__

SLURM_COMMANDS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "sacct")


def classify(args) -> tuple[str, int]:
    """(kind, processes) of a command line."""
    words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    text = " ".join(words)
    first = os.path.basename(words[0]) if words else ""
    if "tests.support.drivers.ranks" in text:
        ranks = int(words[words.index("tests.support.drivers.ranks") + 1])
        return f"direct ranks, {ranks} ranks", ranks + 1
    if "deepspeed.launcher.runner" in text:
        found = re.search(r"--num_gpus[ =](\d+)", text)
        ranks = int(found.group(1)) if found else 1
        return f"deepspeed launcher, {ranks} ranks", ranks + 2
    if first in SLURM_COMMANDS:
        return "slurm command", 1
    if "local_cluster.sh" in text:
        return "slurm cluster script", 1
    if first == "albef-data" or "data_tools" in text:
        return "albef-data", 1
    if first == "albef-ds" or "albef_ds" in text:
        return "albef-ds, 1 rank", 1
    if first.startswith("python"):
        return "python, other", 1
    return f"other ({first})", 1


def _counting_init(self, args, *rest, **kwargs):
    kind, processes = classify(args)
    COUNTS[kind] += 1
    PROCESSES[kind] += processes
    _original_init(self, args, *rest, **kwargs)


def install() -> None:
    subprocess.Popen.__init__ = _counting_init


def dump() -> str:
    """This process's counts as JSON (a pytest-xdist worker hands them to the controller)."""
    return json.dumps({"launches": dict(COUNTS), "processes": dict(PROCESSES)})


def merge(dumped) -> None:
    """Add a worker's :func:`dump` to this process's counts."""
    if dumped:
        data = json.loads(dumped)
        COUNTS.update(data["launches"])
        PROCESSES.update(data["processes"])


def report() -> str:
    lines = [f"process launches: {sum(COUNTS.values())} ({sum(PROCESSES.values())} processes)"]
    lines += [f"  {n:4d} x {kind} ({PROCESSES[kind]} processes)" for kind, n in COUNTS.most_common()]
    path = os.environ.get("ALBEF_TEST_LAUNCHES")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"launches": dict(COUNTS), "processes": dict(PROCESSES)}, f, indent=1)
    return "\n".join(lines)
