"""A run named as a source (``finetune --init RUN``, ``eval --model RUN``) is only read:
its checkpoint is consolidated in memory, never exported into it (a ~30 MB export used to
appear in the source run of every such command, whoever owned it)."""
import hashlib
from pathlib import Path

import pytest

from tests.support.launch import in_process, synth_tasks

pytestmark = pytest.mark.slow


def digest(run: Path) -> dict:
    """Every entry under ``run``: a file's sha256, a folder as such."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(run.rglob("*"))}


def test_finetune_init_and_eval_model_leave_the_source_run_byte_identical(runs, tmp_path):
    source = runs.get("z2_w1").dir  # a pretraining run: checkpoints, no export
    tasks = synth_tasks(tmp_path / "tasks", 8, 4, 4)
    before = digest(source)
    ft = tmp_path / "ve"
    code, out = in_process(["finetune", "--task", "ve", "--config", str(source / "config.yaml"), "--init", str(source),
                            "--run-dir", str(ft), "--set", f"task.train_files=[{tasks / 've_train.json'}]",
                            "--set", f"task.val_file={tasks / 've_dev.json'}", "--set", "train.max_steps=1",
                            "--set", "train.micro_batch_size=4", "--set", "logging.progress_bar=false"])
    assert code == 0, out[-3000:]
    assert digest(source) == before, "finetune --init wrote into its source run"
    assert not (ft / "exports").exists()  # nor is an export made anywhere else

    ft_before = digest(ft)  # the fine-tuned run (a checkpoint, no export), evaluated
    code, out = in_process(["eval", "--task", "ve", "--model", str(ft), "--split", str(tasks / "ve_test.json")])
    assert code == 0, out[-3000:]
    assert "ve accuracy" in out, out[-3000:]
    assert digest(ft) == ft_before, "eval --model wrote into the run it evaluated"
