"""What a new user types first, when it cannot work: refused at once with one line that says
what to change, the exit status 2, and nothing left running.

  too small   a dataset smaller than one global micro-batch (each epoch would give no
              batch): 1 rank as ``albef-ds``, 2 ranks under the ``deepspeed`` launcher.
  no head     ``albef-ds eval --task ve`` of a pretraining run (its classifier was never
              trained: the score would be chance).
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.launch import albef_command, env, in_process, synth_tasks

pytestmark = pytest.mark.slow


def small_synth(root, pairs: int):
    code, text = in_process(["synth", "--out", root, "--seed", "0", "--num-train", pairs, "--num-val", 8,
                             "--num-test", 8, "--no-progress"], program="albef-data")
    assert code == 0, text[-2000:]
    return root / "train"


def run_to_the_end(cmd: list[str], timeout: float = 60) -> tuple[int, str, float]:
    """(exit status, output, seconds); every process of its session must be gone at the end."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-3000:]}")
    elapsed = time.monotonic() - t0
    # helpers that end when their parent does (multiprocessing's resource tracker) may take
    # a moment after it; anything alive 10 s later was left behind
    deadline = time.monotonic() + 10
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the run still alive: {left}\n{out[-3000:]}"
    return proc.returncode, out, elapsed


def session_processes(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [line.strip() for line in ps.splitlines() if line.strip()]


@pytest.mark.parametrize("ranks,pairs", [(1, 20), (2, 60)])
def test_a_dataset_smaller_than_one_global_batch_is_refused_at_start_up(synth_data, tmp_path, ranks, pairs):
    _, tok = synth_data
    train = small_synth(tmp_path / "small", pairs)
    args = ["pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--set", f"data.train_dirs=[{train}]",
            "--set", f"data.tokenizer={tok}", "--set", "logging.progress_bar=false"]
    cmd = albef_command(1, args) if ranks == 1 else albef_command(2, args, launcher="deepspeed")
    # the job used to hang for ever; it now ends in the time it takes to start (2 ranks under
    # the deepspeed launcher: 23 s on an idle machine, 41-48 s beside two other test workers,
    # so a 60 s bound failed in CI now and then): the bound catches a hang, not a slow start
    code, out, elapsed = run_to_the_end(cmd, timeout=180)
    lines = [line for line in out.splitlines() if line.startswith("albef-ds pretrain: error:")]
    assert lines, out[-3000:]
    line = lines[0]
    fits = pairs // ranks
    assert f"{pairs} training pairs" in line and f"32 x {ranks} rank(s) = {32 * ranks} pairs" in line, line
    assert f"--set train.micro_batch_size={fits}" in line, line
    assert code != 0 and "Traceback" not in out, out[-3000:]
    if ranks == 1:
        assert code == 2
    print(f"{ranks} rank(s), {pairs} pairs: exit {code} after {elapsed:.1f}s: {line}")


def test_eval_of_a_task_on_a_model_without_its_trained_head_is_refused(runs, tmp_path):
    pretraining_run = runs.get("z2_w1").dir
    data = synth_tasks(tmp_path / "tasks", 8, 4, 4)
    code, out = in_process(["eval", "--task", "ve", "--model", str(pretraining_run),
                            "--split", str(data / "ve_test.json"), "--out", str(tmp_path / "eval")])
    lines = [line for line in out.splitlines() if line.startswith("albef-ds eval: error:")]
    assert code == 2 and len(lines) == 1, out[-3000:]
    assert "no trained ve head" in lines[0] and "cls_head" in lines[0] and "finetune --task ve" in lines[0], lines
    assert "accuracy" not in out and not (tmp_path / "eval").exists(), out[-3000:]


def test_a_missing_or_empty_model_path_is_named_by_the_flag_the_user_gave(synth_data, tmp_path):
    _, tok = synth_data
    tasks = synth_tasks(tmp_path / "tasks", 8, 4, 4)
    empty_run = tmp_path / "run_without_checkpoint"
    (empty_run / "checkpoints").mkdir(parents=True)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    finetune = ["finetune", "--task", "ve", "--config", "tiny", "--run-dir", str(tmp_path / "ft"),
                "--set", f"task.train_files=[{tasks / 've_train.json'}]", "--set", f"task.val_file={tasks / 've_dev.json'}",
                "--set", f"data.tokenizer={tok}", "--init"]
    cases = {  # argv -> the start of what follows "error: "
        "finetune, no such path": (finetune + [str(tmp_path / "nope")], f"--init {tmp_path / 'nope'}: not found"),
        "finetune, an empty folder": (finetune + [str(empty_dir)],
                                      f"--init {empty_dir}: not a run directory, a checkpoint or an export"),
        "export, a run without a checkpoint": (["export", str(empty_run)],
                                               f"{empty_run}: a run directory without a complete checkpoint"),
        "eval-retrieval, a run without a checkpoint": (
            ["eval-retrieval", "--model", str(empty_run), "--split", str(tasks / "ve_test.json")],
            f"--model {empty_run}: a run directory without a complete checkpoint"),
    }
    for name, (argv, start) in cases.items():
        code, out = in_process(argv)
        lines = [line for line in out.splitlines() if line.startswith("albef-ds ") and ": error: " in line]
        assert code == 2 and len(lines) == 1, (name, code, out[-3000:])
        said = lines[0].split(": error: ", 1)[1]
        assert said.startswith(start), (name, said)
        assert "--resume" not in said, (name, said)
    assert not (tmp_path / "ft").exists()


def test_fine_tuning_from_an_unfinished_run_says_so(runs, tmp_path):
    import shutil
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs.get("z2_w1").dir, unfinished)
    (unfinished / "DONE").unlink()
    tasks = synth_tasks(tmp_path / "tasks", 8, 4, 4)
    code, out = in_process(["finetune", "--task", "ve", "--config", str(unfinished / "config.yaml"),
                            "--init", str(unfinished), "--run-dir", str(tmp_path / "ft"),
                            "--set", f"task.train_files=[{tasks / 've_train.json'}]",
                            "--set", f"task.val_file={tasks / 've_dev.json'}", "--set", "train.max_steps=1",
                            "--set", "train.micro_batch_size=4", "--set", "logging.progress_bar=false"])
    assert code == 0, out[-3000:]
    assert f"note: --init {unfinished} is an unfinished run (no DONE marker): fine-tuning starts from its " \
           f"newest checkpoint (step_00000004)" in out, out[-3000:]


def test_without_the_start_up_refusal_the_loop_still_ends_instead_of_spinning(synth_data, tmp_path, monkeypatch):
    """The loop's own guard (two epochs in a row without a batch), checked by switching the
    start-up refusal off: the run ends with an error instead of spinning forever."""
    from albef_ds.train import trainer
    monkeypatch.setattr(trainer, "_refuse_an_epoch_without_a_batch", lambda *a: None)
    _, tok = synth_data
    train = small_synth(tmp_path / "small", 20)
    code, out = in_process(["pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
                            "--set", f"data.train_dirs=[{train}]", "--set", f"data.tokenizer={tok}",
                            "--set", "logging.progress_bar=false", "--set", "data.num_workers=0"])
    assert code == 1 and "epochs 0 and 1 of the training data gave this rank no batch" in out, out[-3000:]
