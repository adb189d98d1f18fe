"""The objective seam: the registry, and an objective added as one file (itc_only.py plus
its line in OBJECTIVES) trained by the unchanged Trainer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.gather import SINGLE_PROCESS
from albef_ds.objectives import OBJECTIVES, Objective, objective_class

REPO = Path(__file__).resolve().parents[2]


def test_every_registered_objective_resolves_to_its_class():
    for name in OBJECTIVES:
        cls = objective_class(name)
        assert issubclass(cls, Objective) and cls.name == name
        assert "loss" in cls.log_keys


def test_an_unknown_objective_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"'train.objective'.*'nope'.*grounding, itc, nlvr2, nlvr_ta, pretrain, retrieval, ve, vqa"):
        objective_class("nope")


def test_the_itc_only_objective_computes_the_itc_loss_of_the_pretraining_forward():
    """The new objective reuses the ITC term: its loss equals pretraining's loss_itc on the
    same model and batch (fresh queues on both)."""
    from albef_ds.models import ALBEF
    from albef_ds.objectives.itc_only import ITCOnlyObjective
    from albef_ds.objectives.pretrain import albef_forward
    cfg = load_config("tiny", ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1",
                               "model.queue_size=64", "model.hidden_dropout=0", "model.attention_dropout=0",
                               "train.micro_batch_size=4"])
    g = torch.Generator().manual_seed(0)
    batch = dict(images=torch.randn(4, 3, cfg.model.image_res, cfg.model.image_res, generator=g),
                 text_ids=torch.randint(5, 100, (4, 8), generator=g), text_mask=torch.ones(4, 8, dtype=torch.long),
                 image_ids=torch.arange(4))
    torch.manual_seed(0)
    a = ALBEF(cfg.model)
    torch.manual_seed(0)
    b = ALBEF(cfg.model)
    itc = a(ITCOnlyObjective(cfg, None).compute, **batch, alpha=0.3, gather=SINGLE_PROCESS)
    full = b(albef_forward, **batch, alpha=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(itc["loss"], full["loss_itc"])
    assert set(itc) == {"loss", "pos_sim", "neg_sim", "alpha"}


@pytest.mark.slow
def test_the_itc_only_objective_trains_through_the_trainer(synth_data, tmp_path):
    data, tok = synth_data
    run = tmp_path / "itc"
    cmd = [sys.executable, "-m", "albef_ds", "pretrain", "--config", "tiny", "--run-dir", str(run),
           "--set", "train.objective=itc", "--set", f"data.train_dirs=[{data / 'train'}]",
           "--set", f"data.tokenizer={tok}", "--set", "train.max_steps=8", "--set", "train.micro_batch_size=16",
           "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1", "--set", "model.vision_depth=2",
           "--set", "model.text_depth=2", "--set", "model.fusion_layer=1", "--set", "logging.log_every=1",
           "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
           "--set", "distributed.ds_config=zero2_fp32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "objective itc" in proc.stdout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert "loss_itm" not in lines[0] and "loss_mlm" not in lines[0]
    first, last = lines[0]["loss"], sum(x["loss"] for x in lines[-3:]) / 3
    assert last < first, (first, last)  # it learns (measured: see the assertion message on failure)
    assert (run / "DONE").is_file()


def test_random_itm_negatives_apply_for_their_steps_then_hard_ones():
    from albef_ds.objectives.itm import random_share_at
    cfg = load_config("tiny", ["model.itm_random_negatives=1.0"]).model
    assert [random_share_at(s, cfg) for s in (0, 599, 600, 10_000)] == [1.0] * 4  # steps 0: throughout
    cfg = load_config("tiny", ["model.itm_random_negatives=0.5", "model.itm_random_negatives_steps=600"]).model
    assert [random_share_at(s, cfg) for s in (0, 599, 600, 10_000)] == [0.5, 0.5, 0.0, 0.0]
