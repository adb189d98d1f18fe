"""Failure paths: an error ends the job at once, a refused resume changes nothing, a resumed
run's logs read as one run, a run removes only its own shared memory."""
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.launch import albef_command, call, env, in_process
from tests.support.runs import pretrain_args

pytestmark = pytest.mark.slow

#: from the moment of the failure to the end of the whole launch (a hang would take the
#: subprocess timeout); generous for 2 shared cores and the deepspeed launcher's kill.
ENDS_WITHIN_S = 30


def command(ranks: int, run_dir: Path, data: Path, tok: Path, extra=(), steps: int = 20,
            module: str = "albef_ds") -> list[str]:
    """The session recipe (tests/support/runs.py) in ``run_dir`` as a launch of its own."""
    return albef_command(ranks, pretrain_args(run_dir, data, tok, ranks, steps, extra), module=module,
                         launcher="deepspeed")


@pytest.mark.parametrize("ranks, where", [(1, "worker"), (2, "worker"), (1, "main")])
def test_an_error_in_the_loop_with_loader_workers_ends_the_job_within_seconds(synth_data, tmp_path, ranks, where):
    """An error raised in a loader worker (as an unreadable shard's is) used to hang the rank:
    its workers ignore SIGTERM and multiprocessing joins them at exit (measured: alive after
    90 s and a SIGTERM). With 2 ranks the error is on rank 1; the launcher must end rank 0."""
    data, tok = synth_data
    cmd = command(ranks, tmp_path / "run", data, tok, ["--set", "data.num_workers=2"],
                  module="tests.support.drivers.inject_error")
    proc = subprocess.run(cmd, env=env(INJECT_AT="40" if where == "worker" else "3", INJECT_IN=where,
                                       INJECT_RANK=str(ranks - 1)), capture_output=True, text=True, timeout=300)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "INJECTED" in out, out[-3000:]
    injected = min(float(t) for t in re.findall(r"INJECTED (\d+\.\d+)", out))
    assert "injected failure in the training loop" in out
    assert ended - injected < ENDS_WITHIN_S, f"ended {ended - injected:.1f} s after the failure"


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_truncated_shard_is_named_at_start_up_and_ends_the_job(synth_data, tmp_path, ranks):
    data, tok = synth_data
    bad = tmp_path / "data"
    shutil.copytree(data / "train", bad / "train")
    shard = sorted((bad / "train").rglob("*.mds"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    start = time.time()
    if ranks == 1:  # in-process: the same start-up path as a launch of its own
        code, out = in_process(pretrain_args(tmp_path / "run", bad, tok, 1, 20))
    else:
        code, out = call(command(ranks, tmp_path / "run", bad, tok), ok=False, timeout=300)
    assert code != 0
    assert f"shard {shard}" in out and "truncated" in out, out[-3000:]
    assert time.time() - start < 120


def _digest(run: Path) -> dict:
    """Every file of the run but the lock (which names whoever last held it)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def four_steps(runs, tmp_path_factory):
    """A copy of the session's 1-rank run (z2_w1: a step-4 checkpoint), and a second,
    smaller vocabulary."""
    root = tmp_path_factory.mktemp("refused")
    run = root / "run"
    shutil.copytree(runs.get("z2_w1").dir, run)
    other_tok = root / "tok150"
    from albef_ds.tokenizer import build_vocab
    build_vocab([str(runs.data / "captions.txt")], other_tok, vocab_size=150)
    return run, other_tok


@pytest.mark.parametrize("change", ["tokenizer", "batch"])
def test_a_refused_resume_names_both_values_and_changes_nothing(synth_data, four_steps, change):
    data, tok = synth_data
    run, other_tok = four_steps
    before = _digest(run)
    extra = ["--set", "train.max_steps=8"]
    if change == "tokenizer":
        extra += ["--set", f"data.tokenizer={other_tok}"]
    if change == "batch":
        extra += ["--set", "train.micro_batch_size=8"]
    code, out = in_process(pretrain_args(run, data, tok, 1, 20, extra))
    assert code != 0
    from albef_ds.tokenizer import load_tokenizer
    if change == "tokenizer":
        old, new = len(load_tokenizer(str(tok))), len(load_tokenizer(str(other_tok)))
        assert f"model.vocab_size: {old} in the checkpoint, {new} here" in out, out[-3000:]
        assert str(other_tok) in out
    else:
        assert "global batch 16 in the checkpoint, 8 here" in out, out[-3000:]
    assert _digest(run) == before  # config.yaml, latest, checkpoints, metrics: byte-identical


def test_shared_memory_clean_up_removes_only_this_runs_buffer(tmp_path):
    from albef_ds.distributed import LaunchEnv
    from albef_ds.train.engines.deepspeed import clean_shared_memory_leftovers
    uid = os.getuid()
    mine = LaunchEnv(1, 1, 2, 2, "127.0.0.1", 29517, "deepspeed/torchrun")
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29517_1",   # this rank's: removed
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29517_0",   # the other rank removes its own
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29600_1",   # another job on this host
             f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_29517_1",  # another user's
             "000001_barrier"]                                         # streaming's
    for n in names:
        (tmp_path / n).write_text("x")
    clean_shared_memory_leftovers(mine, shm=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def _wait_for(path: Path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _identity(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def test_a_killed_jobs_shared_memory_is_reclaimed_by_its_own_run_only(synth_data, tmp_path):
    """Run Y is SIGKILLed and leaves its streaming segments; run X starts beside it on the
    same host; Y's next start removes Y's leftovers while X's live ones stay."""
    import json
    import signal

    from albef_ds.data.shm import SHM_DIR, record_path
    data, tok = synth_data
    long_run = ["--set", "train.max_steps=400", "--set", "checkpoint.every_steps=400"]
    procs = []
    try:
        def start(name, extra):
            p = subprocess.Popen(command(1, tmp_path / name, data, tok, extra), env=env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            return p
        y = start("y", long_run)
        _wait_for(record_path(tmp_path / "y"), y)
        y_prefix = json.loads(record_path(tmp_path / "y").read_text())["prefix"]
        os.killpg(y.pid, signal.SIGKILL)
        y.wait()
        # a segment is known by its inode and change time, not its name: once reclaimed, the
        # prefix is free and a test running beside this one may create the same names anew
        y_left = {p.name: _identity(p) for p in SHM_DIR.glob(f"{y_prefix:06}_*")}
        assert y_left, "the killed run left no shared memory: nothing to test"
        x = start("x", long_run)
        _wait_for(record_path(tmp_path / "x"), x)
        x_prefix = json.loads(record_path(tmp_path / "x").read_text())["prefix"]
        x_live = sorted(p.name for p in SHM_DIR.glob(f"{x_prefix:06}_*"))
        assert x_prefix != y_prefix and x_live
        # a process of its own: in the pytest process, the rerun's own segments (which may
        # reuse Y's freed prefix and so Y's names) outlive the run until garbage collection
        call(command(1, tmp_path / "y", data, tok, steps=2))
        still = [n for n, ident in y_left.items() if _identity(SHM_DIR / n) == ident]
        assert not still, f"run Y's leftovers are still there: {still}"
        assert all((SHM_DIR / n).exists() for n in x_live), "run X's live shared memory was touched"
        assert x.poll() is None, "run X died"
    finally:
        from albef_ds.data.shm import reclaim
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for run in ("x", "y"):  # leave the host's /dev/shm as it was
            reclaim(tmp_path / run)
