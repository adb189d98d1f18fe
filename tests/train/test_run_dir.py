"""A run directory holds one run (issue 15, "Runs"): a lock refuses a second start, a fresh
start over an earlier run needs --overwrite (which clears it), a resume lists config
changes key by key, and a log written to a file has one plain line per log interval and
no carriage return (tests/train/test_export.py: exports).

1-rank runs of a very small model (a few seconds each), in-process (the same path as
``python -m albef_ds``, tests/support/runs.py) but for two processes started at once."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import env, in_process
from tests.support.runs import small_run_args

pytestmark = pytest.mark.slow


def run_1(args, log: Path, ok: bool = True, cwd=None) -> tuple[int, str]:
    """One rank in this process, its output into ``log`` as a SLURM job's is into a file."""
    code, text = in_process(args, log, cwd=cwd)
    if ok:
        assert code == 0, text[-4000:]
    return code, text


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_logged(run_dir: Path) -> list[int]:
    """The steps of the metrics rows (a resume's marker row is none)."""
    return [row["step"] for row in metrics_rows(run_dir) if "event" not in row]


def test_a_log_written_to_a_file_has_one_plain_line_per_interval_and_no_carriage_return(synth_data, tmp_path):
    data, tok = synth_data
    # the progress bar is on (the preset's default): into a file it must not be drawn
    _, text = run_1(small_run_args(tmp_path / "run", data, tok, "--set", "logging.progress_bar=true"), tmp_path / "log")
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], text[-3000:]
    for line in lines:
        for word in ("itc ", "itm ", "mlm ", "lr ", "pairs/s", "TFLOP/s", "mem ", "ETA "):
            assert word in line, (word, line)
    assert "done: 6 steps" in text


def test_resume_none_into_a_used_run_dir_is_refused_then_overwrite_clears_it(synth_data, tmp_path):
    """The old run reached step 6 (checkpoints 4 and 6 kept); the new one, 4 steps, used to
    lose its own checkpoints to rotation (old, higher steps sort as newer) and export the
    old run's model."""
    data, tok = synth_data
    run = tmp_path / "run"
    run_1(small_run_args(run, data, tok), tmp_path / "first.log")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    code, text = run_1(small_run_args(run, data, tok, "--resume", "none", steps=4), tmp_path / "refused.log", ok=False)
    assert code == 2, text[-3000:]
    assert "holds an earlier run" in text and "--overwrite" in text and "Traceback" not in text
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before

    _, text = run_1(small_run_args(run, data, tok, "--overwrite", steps=4), tmp_path / "overwrite.log")
    assert "removed the earlier run's" in text
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000004" / "albef_meta.json").is_file()
    assert steps_logged(run) == [2, 4]  # nothing of the old run's metrics
    assert (run / "DONE").read_text() == "4"

    code, text = run_1(small_run_args(run, data, tok, "--overwrite", "--resume", "auto"), tmp_path / "both.log", ok=False)
    assert code == 2 and "cannot be combined with --resume auto" in text


def test_a_second_start_into_an_active_run_dir_is_refused_naming_the_holder(synth_data, tmp_path):
    from albef_ds.train.run_dir import RunDirLock
    data, tok = synth_data
    run = tmp_path / "run"
    lock = RunDirLock(run).acquire()
    try:
        code, text = run_1(small_run_args(run, data, tok), tmp_path / "busy.log", ok=False)
    finally:
        lock.release()
    assert code == 2, text[-3000:]
    assert "is in use by another run" in text and f"pid {os.getpid()}" in text and "Traceback" not in text
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()


def test_a_killed_holders_lock_does_not_block_the_resume(synth_data, tmp_path):
    data, tok = synth_data
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from albef_ds.train.run_dir import "
                               "RunDirLock; RunDirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
                               "time.sleep(600)", str(run)], env=env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # the stale file is still there
    run_1(small_run_args(run, data, tok, steps=2), tmp_path / "after.log")
    assert steps_logged(run) == [2]


def test_two_runs_started_at_once_into_one_dir_do_not_both_succeed(synth_data, tmp_path):
    data, tok = synth_data
    run = tmp_path / "run"
    procs, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"run{i}.log")
        f = open(logs[-1], "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "albef_ds", *small_run_args(run, data, tok, steps=20)],
                                      env=env(), stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    texts = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 2], texts
    assert "is in use by another run" in texts[codes.index(2)]
    assert steps_logged(run) == list(range(2, 21, 2))  # one run's lines, in order, once each


def test_a_changed_config_on_resume_is_listed_key_by_key(synth_data, tmp_path):
    data, tok = synth_data
    run = tmp_path / "run"
    run_1(small_run_args(run, data, tok, steps=2), tmp_path / "first.log")
    before = (run / "config.yaml").read_text()
    _, text = run_1(small_run_args(run, data, tok, "--set", "train.lr=0.0002", "--set", "model.momentum=0.99", steps=4),
                   tmp_path / "resume.log")
    assert "resumed from" in text
    assert "the config differs from the checkpoint's" in text and "3 key(s)" in text
    assert "\n  train.lr: 0.0005 -> 0.0002: applied: the lr schedule is re-derived" in text, text[-3000:]
    assert "\n  model.momentum: 0.995 -> 0.99: applied" in text
    assert text.index("train.max_steps: 2 -> 4") < text.index("resumed from")
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.0002 and saved["train"]["max_steps"] == 4 and before != (run / "config.yaml").read_text()
    assert steps_logged(run) == [2, 4]
    # metrics.jsonl says where the second launch took over, and when each row was written
    rows = metrics_rows(run)
    assert [row.get("event") for row in rows] == [None, "resume", None], rows
    assert rows[1]["step"] == 2 and rows[1]["from"] == str(run / "checkpoints" / "step_00000002"), rows[1]
    assert rows[1]["world_size"] == 1
    assert all(isinstance(row["time"], float) for row in rows) and [r["time"] for r in rows] == sorted(r["time"] for r in rows)
