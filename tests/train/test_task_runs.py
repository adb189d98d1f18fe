"""A downstream task trains like pretraining: 2 ranks (started as a launcher starts them), sample
keys logged per rank, per-epoch evaluation, and a run resumed from its step-4 checkpoint
continues with exactly the losses and samples of the uninterrupted run (the task loader's
position, the per-sample augmentation and the RNG all restored). VE and VQA: a classifier
head with momentum distillation, and an answer decoder with a variable number of answers."""
import json
import shutil

import pytest

from tests.support.launch import albef_command, call, synth_tasks
from tests.support.runs import keys

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return synth_tasks(tmp_path_factory.mktemp("tasks"), 40, 16, 4)


def command(task: str, run_dir, data, tok, init, extra=()) -> list[str]:
    files = {"ve": ("ve_train", "ve_dev"), "vqa": ("vqa_train", "vqa_val")}[task]
    sets = [f"task.train_files=[{data / (files[0] + '.json')}]", f"task.val_file={data / (files[1] + '.json')}",
            f"data.tokenizer={tok}", f"train.max_steps={STEPS}", "train.steps_per_epoch=4", "train.micro_batch_size=4",
            "train.lr=1e-3", "train.warmup_steps=2", "model.momentum=0.9", "model.vision_depth=2",
            "model.text_depth=2", "model.fusion_layer=1", "model.queue_size=0", "logging.log_every=1",
            "checkpoint.every_steps=4", "checkpoint.keep_last=10", "logging.log_sample_keys=true",
            "logging.progress_bar=false", "logging.tensorboard=false", "data.num_workers=1",
            f"task.answer_list={data / 'answer_list.json'}", *extra]
    return albef_command(2, ["finetune", "--task", task, "--config", "tiny", "--init", str(init),
                             "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]])


def initial_weights(tok, path):
    """A fresh tiny pretraining model of the run's shapes (the --init a user would pass)."""
    import torch

    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    from albef_ds.tokenizer import load_tokenizer
    cfg = load_config("tiny", ["model.vision_depth=2", "model.text_depth=2", "model.fusion_layer=1",
                               "model.queue_size=0", f"model.vocab_size={len(load_tokenizer(str(tok)))}"])
    torch.manual_seed(0)
    torch.save({"model": ALBEF(cfg.model).state_dict()}, path)
    return path


def per_step(run_dir) -> dict:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m
    return out


@pytest.mark.parametrize("task", ["ve", "vqa"])
def test_two_rank_task_run_resumes_exactly_from_its_checkpoint(task, tasks, synth_data, tmp_path):
    _, tok = synth_data
    init = initial_weights(tok, tmp_path / "init.pth")
    full = tmp_path / "full"
    call(command(task, full, tasks, tok, init), tmp_path / "full.log")
    # a second run directory holding only the step-4 checkpoint, resumed from it
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    shutil.copy(full / "config.yaml", resumed / "config.yaml")
    for name in ("metrics.jsonl", "sample_keys_rank0.jsonl", "sample_keys_rank1.jsonl"):
        kept = [line for line in (full / name).read_text().splitlines() if json.loads(line)["step"] <= 4]
        (resumed / name).write_text("\n".join(kept) + "\n")
    call(command(task, resumed, tasks, tok, init, ["checkpoint.resume=auto"]), tmp_path / "resumed.log")

    a, b = per_step(full), per_step(resumed)
    assert sorted(a) == list(range(1, STEPS + 1)) == sorted(b)
    for step in range(5, STEPS + 1):
        assert a[step]["loss"] == b[step]["loss"], (step, a[step], b[step])
    for rank in (0, 1):
        assert keys(full, rank) == keys(resumed, rank)
    both = keys(full, 0)[(0, 0)] + keys(full, 1)[(0, 0)]
    assert len(set(both)) == len(both) == 8  # the ranks' batches are disjoint
    val = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if '"acc"' in line
           and '"chance"' in line]
    assert [v["step"] for v in val] == [4, 8] and all(0.0 <= v["acc"] <= 1.0 for v in val)
    assert (full / "best.json").is_file() and "resumed from" in (tmp_path / "resumed.log").read_text()
