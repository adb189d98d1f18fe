"""Each downstream task end to end, as a user runs it: ``albef-data synth-tasks``, then
``albef-ds finetune --task T`` from the demo's pretrained run (the session fixture: 300
pretraining steps), then ``albef-ds eval --task T`` on the test split. Short runs; the bars
are well above chance but below the full-length figures (docs/benchmarks.md, 3 seeds).

SNLI-VE's neutral hypotheses add a property no picture shows, so a text-only model reaches
2/3 (neutral right, entailment/contradiction at a coin flip): its bar is chance-relative
only, and docs/benchmarks.md says what image-dependent accuracy the runs reach.
"""
import json
from pathlib import Path

import pytest

from conftest import run_albef, run_cli

#: task -> (fine-tuning steps, extra overrides, test-split bar on accuracy, chance)
RECIPES = {
    "ve": (150, [], None),
    "vqa": (150, [], None),
    "nlvr2": (150, [], None),
    "grounding": (150, [], None),
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    run_cli(["albef-data", "synth-tasks", "--out", str(out), "--num-train", "800", "--num-val", "100",
             "--num-test", "100", "--no-progress"])
    return out


def task_files(task: str, data: Path) -> tuple[list[str], Path]:
    train, val, test = {"ve": ("ve_train", "ve_dev", "ve_test"), "vqa": ("vqa_train", "vqa_val", "vqa_test"),
                        "nlvr2": ("nlvr_train", "nlvr_dev", "nlvr_test"),
                        "grounding": ("grounding_train", "grounding_val", "grounding_test")}[task]
    sets = [f"task.train_files=[{data / (train + '.json')}]", f"task.val_file={data / (val + '.json')}"]
    if task == "vqa":
        sets.append(f"task.answer_list={data / 'answer_list.json'}")
    return sets, data / (test + ".json")


def finetune_and_test(task: str, demo_dir: Path, data: Path, run_dir: Path, steps: int, extra) -> dict:
    sets, test_split = task_files(task, data)
    sets += [f"data.tokenizer={demo_dir / 'tokenizer'}", f"train.max_steps={steps}", "train.lr=4e-4",
             "train.warmup_steps=20", "logging.progress_bar=false", "checkpoint.every_steps=100000",
             "model.queue_size=0", "eval.batch_size=100", *extra]
    run_albef(["finetune", "--task", task, "--config", "tiny", "--init", str(demo_dir / "run"),
               "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]], threads=2)
    run_albef(["eval", "--task", task, "--model", str(run_dir), "--split", str(test_split),
               "--out", str(run_dir / "test")], threads=2)
    return json.loads((run_dir / "test" / "metrics.json").read_text())


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_finetuned_task_beats_chance_on_its_synthetic_test_split(task, demo, tasks, tmp_path):
    steps, extra, bar = RECIPES[task]
    metrics = finetune_and_test(task, demo[0], tasks, tmp_path / task, steps, extra)
    print(task, metrics)
    assert metrics["n"] > 0
    if bar is not None:
        assert metrics["acc"] >= bar, metrics
