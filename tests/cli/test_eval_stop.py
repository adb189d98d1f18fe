"""SIGTERM during an evaluation ends it at the next batch: one plain line naming the signal,
exit status 128 + 15, no traceback. The demo's evaluation used to go on for 2.5 minutes
after one; ``albef-ds eval-retrieval`` ended at once without a word (the default action).
Each loop's check: tests/eval/test_eval_stop.py."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.launch import env

pytestmark = pytest.mark.slow

#: from the signal to the end of the process: measured 0.3 s (eval-retrieval) and 0.6 s
#: (demo) on 2 cores; the evaluation itself takes 8 s (eval-retrieval, k 200, batches of 1)
ENDS_WITHIN_S = 10


def sigterm_once_evaluating(argv: list[str], marker: str) -> tuple[int, str, float]:
    """Start ``albef-ds ARGV``, SIGTERM it when a line starts with ``marker``: (exit status,
    output, seconds from the signal to the end)."""
    proc = subprocess.Popen([sys.executable, "-m", "albef_ds", *argv], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, sent = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if sent is None and line.startswith(marker):
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
        proc.wait(timeout=ENDS_WITHIN_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines)
    assert sent is not None, f"no line starting with {marker!r}:\n{out[-3000:]}"
    return proc.returncode, out, time.monotonic() - sent


def test_sigterm_during_eval_retrieval_ends_it_with_one_line(synth_data):
    data, tok = synth_data
    code, out, took = sigterm_once_evaluating(
        ["eval-retrieval", "--untrained", "--config", "tiny", "--set", f"data.tokenizer={tok}", "--split",
         str(data / "test.json"), "--set", "eval.batch_size=1", "--k", "200", "--compositional", "none"],
        "evaluating retrieval:")
    last = out.strip().splitlines()[-1]
    assert code == 128 + signal.SIGTERM and took < ENDS_WITHIN_S, (code, took, out[-3000:])
    assert last.startswith("albef-ds eval-retrieval: stopped by SIGTERM during the retrieval evaluation ("), last
    assert last.endswith("no result written; rerun the same command to evaluate"), last
    assert "Traceback" not in out and "chance" not in out, out[-3000:]
    print(f"ended {took:.2f} s after the signal: {last}")


def test_sigterm_during_the_demos_evaluation_ends_it_with_one_line(tmp_path):
    code, out, took = sigterm_once_evaluating(
        ["demo", "--out", str(tmp_path / "demo"), "--train-pairs", "64", "--steps", "1", "--test-images", "40",
         "--set", "logging.progress_bar=false"], "== 4/4")
    last = out.strip().splitlines()[-1]
    assert code == 128 + signal.SIGTERM and took < ENDS_WITHIN_S, (code, took, out[-3000:])
    assert last.startswith("albef-ds demo: stopped by SIGTERM during the retrieval evaluation ("), last
    assert f"training is done: checkpoints in {tmp_path / 'demo' / 'run' / 'checkpoints'}" in last, last
    assert "Traceback" not in out and "done in" not in out, out[-3000:]
    print(f"ended {took:.2f} s after the signal: {last}")
