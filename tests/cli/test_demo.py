"""``albef-ds demo`` end to end (a shorter variant than the README's), then
``albef-ds finetune-retrieval`` from its checkpoint: at the demo's resolution it must raise
ITC R@1 on the synth val split; at 96 px it must resample and keep the best epoch.

The short variant (2,000 train pairs, 300 steps, 100 test images: chance R@1 1 %) has a
lower bar than the full demo's 20x: ITC-only R@1 at least 5x chance both ways and R@10 at
least 30 % (3x chance). Measured here (1 thread): ITC TR@1 27 %, IR@1 21.6 %, TR@10 83 %,
IR@10 82.6 %. After only 300 steps the ITM head is not trained enough to re-rank (re-ranked
IR@1 4.2 %), so re-ranked figures are only compared with the untrained model's; the full
demo's (1,000 steps) are in docs/benchmarks.md.
"""
import json
from pathlib import Path

import pytest

# The demo run itself is the session fixture ``demo`` (tests/conftest.py): the downstream
# task tests (tests/objectives/test_tasks_end_to_end.py) fine-tune from the same run.
from tests.support.launch import DEMO_STEPS as STEPS, run_albef as run

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_reports_against_chance(demo):
    out, stdout, result = demo
    assert "chance" in stdout and "TensorBoard" in stdout and str(out / "run" / "checkpoints") in stdout
    trained, untrained = result["trained"], result["untrained"]
    assert trained["chance_img_r1"] == pytest.approx(100 / 100)
    assert trained["chance_txt_r1"] == pytest.approx(100 * 5 / 500)
    assert trained["num_images"] == 100 and trained["num_texts"] == 500
    for key in ("itm_txt_r1", "itm_img_r10", "itc_txt_r1", "itm_r_mean", "itm_itc_r_mean"):
        assert 0.0 <= trained[key] <= 100.0
    assert "txt_r1" not in trained and "r_mean" not in trained  # every figure names its ranking
    # it learns: ITC retrieval far above chance, and the re-ranked table above the untrained one
    assert trained["itc_txt_r1"] >= 5 * trained["chance_txt_r1"], trained
    assert trained["itc_img_r1"] >= 5 * trained["chance_img_r1"], trained
    assert trained["itc_txt_r10"] >= 30.0 and trained["itc_img_r10"] >= 30.0, trained
    assert trained["itm_r_mean"] >= 2 * untrained["itm_r_mean"], (trained, untrained)
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-1] == STEPS
    assert metrics[-1]["loss_itc"] < metrics[0]["loss_itc"] and metrics[-1]["loss_mlm"] < metrics[0]["loss_mlm"]
    assert (out / "run" / "DONE").is_file()


def val_recall(out: Path, dest: Path) -> dict:
    run(["eval-retrieval", "--model", str(out / "run"), "--split", str(out / "data" / "val.json"),
         "--max-images", "100", "--out", str(dest), "--tokenizer", str(out / "tokenizer")])
    return json.loads((dest / "retrieval.json").read_text())


def finetune(out: Path, run_dir: Path, *overrides: str) -> list[dict]:
    """``finetune-retrieval`` from the demo run; returns the per-epoch val results."""
    data = out / "data"
    sets = [f"data.tokenizer={out / 'tokenizer'}", f"data.val_dir={data / 'val.json'}", "eval.max_images=100",
            f"data.train_dirs=[{data / 'train'}]", "logging.progress_bar=false", "checkpoint.every_steps=1000",
            *overrides]
    run(["finetune-retrieval", "--config", str(out / "run" / "config.yaml"), "--init", str(out / "run"),
         "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "itm_r_mean" in line and "loss" not in line]


def test_finetuning_the_demo_checkpoint_raises_val_recall_at_1(demo, tmp_path):
    """100 steps of retrieval fine-tuning (id positives, no MLM) at lr 2e-5, i.e. near where
    pretraining's cosine ended (a fresh optimizer at the pretraining peak lr first loses
    recall: docs/benchmarks.md). ITC R@1 must rise in sum and drop neither way. Re-ranked R@1 is not asserted
    here: after 300 pretraining steps the ITM head is still at its prior and re-ranking
    measures its noise (re-ranked IR@1 7.8 % against 23.8 % by ITC before fine-tuning).
    Measured here (ITM negatives drawn images first, as the reference): ITC TR@1 31 -> 39 %,
    IR@1 26.6 -> 26.6 % (one caption in 500 is the resolution); earlier, texts first:
    TR@1 33 -> 38 %, IR@1 23.8 -> 26.8 %."""
    out, _, _ = demo
    before = val_recall(out, tmp_path / "before")
    val = finetune(out, tmp_path / "ft", "train.max_steps=100", "train.steps_per_epoch=50", "train.lr=2e-5",
                   "train.warmup_steps=5")
    best = json.loads((tmp_path / "ft" / "best.json").read_text())
    after = next(v for v in val if v["itm_r_mean"] == best["itm_r_mean"])
    for key in ("itc_txt_r1", "itc_img_r1"):
        assert after[key] >= before[key], (key, before, after)
    assert after["itc_txt_r1"] + after["itc_img_r1"] > before["itc_txt_r1"] + before["itc_img_r1"], (before, after)
    for key in ("itc_r_mean", "itm_r_mean"):
        assert after[key] > before[key], (key, before, after)


def test_finetuning_the_demo_checkpoint_at_96px_keeps_the_best_epoch(demo, tmp_path):
    """At a new resolution (position embeddings resampled): one val evaluation per epoch,
    the best one's checkpoint kept, and the fine-tuning switches recorded in its config."""
    out, _, _ = demo
    val = finetune(out, tmp_path / "ft", "train.max_steps=20", "train.steps_per_epoch=10", "train.lr=2e-5",
                   "train.warmup_steps=5", "model.image_res=96")
    best = json.loads((tmp_path / "ft" / "best.json").read_text())
    assert (tmp_path / "ft" / "checkpoints" / best["tag"]).is_dir()
    assert len(val) == 2, val  # one evaluation per epoch
    assert best["itm_r_mean"] == max(v["itm_r_mean"] for v in val)
    from albef_ds.config import load_config
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert cfg.model.image_res == 96 and cfg.model.itc_id_positives and not cfg.model.mlm
