"""``albef-ds demo`` end to end (a shorter variant than the README's), then
``albef-ds finetune-retrieval`` from its checkpoint at a new resolution.

These tests check the pipeline and its outputs, not a learning bar: from random
initialisation the tiny model's image and text features collapse (in-batch cosine ~0.96)
and zero-shot recall stays at 3-4x chance after the full demo (docs/benchmarks.md). The
issue's bar (20x chance) is not reached yet; a test claiming it would fail.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def run(argv, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "albef_ds", *argv], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    stdout = run(["demo", "--out", str(out), "--train-pairs", "2000", "--test-images", "100", "--steps", str(STEPS),
                  "--set", "logging.progress_bar=false"])
    return out, stdout, json.loads((out / "run" / "retrieval.json").read_text())


def test_demo_runs_end_to_end_and_reports_against_chance(demo):
    out, stdout, result = demo
    assert "chance" in stdout and "TensorBoard" in stdout and str(out / "run" / "checkpoints") in stdout
    trained, untrained = result["trained"], result["untrained"]
    assert trained["chance_img_r1"] == pytest.approx(100 / 100)
    assert trained["chance_txt_r1"] == pytest.approx(100 * 5 / 500)
    assert trained["num_images"] == 100 and trained["num_texts"] == 500
    assert trained != untrained
    for key in ("txt_r1", "img_r10", "itc_txt_r1", "r_mean"):
        assert 0.0 <= trained[key] <= 100.0
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-1] == STEPS
    assert metrics[-1]["loss_mlm"] < metrics[0]["loss_mlm"]  # the language side learns within 40 steps
    assert (out / "run" / "DONE").is_file()


def test_finetuning_the_demo_checkpoint_at_96px_keeps_the_best_epoch(demo, tmp_path):
    out, _, _ = demo
    data = out / "data"
    common = ["--set", f"data.tokenizer={out / 'tokenizer'}", "--set", f"data.val_dir={data / 'val.json'}",
              "--set", "eval.max_images=100"]
    before = tmp_path / "before"
    run(["eval-retrieval", "--model", str(out / "run"), "--split", str(data / "val.json"), "--max-images", "100",
         "--out", str(before), "--tokenizer", str(out / "tokenizer")])
    start = json.loads((before / "retrieval.json").read_text())
    run(["finetune-retrieval", "--config", str(out / "run" / "config.yaml"), "--init", str(out / "run"),
         "--run-dir", str(tmp_path / "ft"), "--set", f"data.train_dirs=[{data / 'train'}]",
         "--set", "train.max_steps=20", "--set", "train.steps_per_epoch=10", "--set", "train.lr=2e-4",
         "--set", "train.warmup_steps=5", "--set", "model.image_res=96", "--set", "logging.progress_bar=false",
         "--set", "checkpoint.every_steps=1000", *common])
    best = json.loads((tmp_path / "ft" / "best.json").read_text())
    assert (tmp_path / "ft" / "checkpoints" / best["tag"]).is_dir()
    val = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
           if "r_mean" in line and "loss" not in line]
    assert len(val) == 2, val  # one evaluation per epoch
    assert best["r_mean"] == max(v["r_mean"] for v in val)
    assert 0.0 <= start["r_mean"] <= 100.0
    from albef_ds.config import load_config
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert cfg.model.image_res == 96 and cfg.model.itc_id_positives and not cfg.model.mlm
