"""The text form (data.text_form) travels with the weights: a checkpoint's meta, an export's
model.pt, albef.pth and config.yaml record it; a resume, a fine-tuning ``--init`` and an
evaluation with the other form are refused with one line naming both; what records none was
written before the setting existed and counts as the legacy form, cls_sep (a weights file
with neither record nor config beside it: the reference release's, cls_only)."""
import argparse
import json
import re
import shutil

import pytest
import torch
import yaml

from albef_ds.config import ConfigError
from albef_ds.train.export import load_saved_config, resolve_init
from albef_ds.train.trainer import build_model

from tests.support.launch import in_process
from tests.support.runs import small_run_args

pytestmark = pytest.mark.slow


def call(args, log, ok: bool = True) -> tuple[int, str]:
    """One rank, in-process (tests/support/runs.py)."""
    code, text = in_process(args, log)
    if ok:
        assert code == 0, text[-4000:]
    return code, text

BOTH = r"cls_sep \(\[CLS\] words \[SEP\]\).*cls_only \(\[CLS\] words\)"
BOTH_REVERSED = r"cls_only \(\[CLS\] words\).*cls_sep \(\[CLS\] words \[SEP\]\)"


def retrieval_args(model, *overrides, config=None):
    return argparse.Namespace(model=str(model), config=config, overrides=list(overrides), untrained=False)


def test_the_form_is_recorded_everywhere_and_another_form_is_refused(synth_data, tmp_path):
    from albef_ds.cli import eval_retrieval
    data, tok = synth_data
    run = tmp_path / "run"
    call(small_run_args(run, data, tok, steps=2), tmp_path / "train.log")
    tag = run / "checkpoints" / "step_00000002"
    assert json.loads((tag / "albef_meta.json").read_text())["text_form"] == "cls_only"

    # what finetune --init RUN and eval --model RUN load: the checkpoint where it is (nothing is
    # written into the run), or the export of it once `albef-ds export` has made one
    init = resolve_init(str(run))
    assert init == str(tag) and not (run / "exports").exists()
    call(["export", str(run)], tmp_path / "export.log")
    export = tmp_path / "run" / "exports" / "step_00000002"
    assert resolve_init(str(run)) == str(export / "model.pt")
    assert torch.load(export / "model.pt", weights_only=False)["text_form"] == "cls_only"
    assert torch.load(export / "albef.pth", weights_only=False)["text_form"] == "cls_only"
    assert yaml.safe_load((export / "config.yaml").read_text())["data"]["text_form"] == "cls_only"

    # resume with the other form: the CLI's one line naming both, exit 2, nothing written
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, text = call(small_run_args(run, data, tok, "--set", "data.text_form=cls_sep", steps=4),
                      tmp_path / "resume.log", ok=False)
    last = text.strip().splitlines()[-1]
    assert code == 2 and "cannot resume" in last, text[-2000:]
    assert "cls_only ([CLS] words)" in last and "cls_sep ([CLS] words [SEP])" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    # fine-tuning from it (build_model: what finetune and eval run) with the other form
    quiet = dict(log=lambda *a: None)
    with pytest.raises(ConfigError, match=BOTH_REVERSED):
        build_model(load_saved_config(run / "config.yaml", ["data.text_form=cls_sep",
                                                             f"checkpoint.init_from={init}"]), **quiet)
    build_model(load_saved_config(run / "config.yaml", [f"checkpoint.init_from={init}"]), **quiet)
    # evaluation: a task, retrieval from the run, from albef.pth with a config
    # (the command in this process, its stop handlers put back after it: tests/support/launch.py)
    (tmp_path / "never-read.json").write_text("[]")  # checked before the model is built, never read
    code, text = call(["eval", "--task", "ve", "--model", str(export), "--split", str(tmp_path / "never-read.json"),
                       "--set", "data.text_form=cls_sep"], tmp_path / "eval.log", ok=False)
    assert code == 2 and re.search(BOTH_REVERSED, text.strip().splitlines()[-1]), text[-2000:]
    with pytest.raises(ConfigError, match=BOTH_REVERSED):
        eval_retrieval.load_model(retrieval_args(run, "data.text_form=cls_sep"))
    with pytest.raises(ConfigError, match=BOTH_REVERSED):
        eval_retrieval.load_model(retrieval_args(export / "albef.pth", "data.text_form=cls_sep",
                                                 config=str(run / "config.yaml")))
    eval_retrieval.load_model(retrieval_args(run))

    # a weights file with no record and no config beside it: the reference release's form
    bare = tmp_path / "bare" / "ALBEF.pth"
    bare.parent.mkdir()
    torch.save({"model": torch.load(export / "albef.pth", weights_only=False)["model"]}, bare)
    with pytest.raises(ConfigError, match=BOTH_REVERSED):
        eval_retrieval.load_model(retrieval_args(bare, "data.text_form=cls_sep", config=str(run / "config.yaml")))
    eval_retrieval.load_model(retrieval_args(bare, config=str(run / "config.yaml")))


def test_a_run_from_before_the_setting_counts_as_cls_sep(synth_data, tmp_path):
    from albef_ds.cli import eval_retrieval
    from albef_ds.train.checkpoint import check_resumable
    data, tok = synth_data
    run = tmp_path / "run"
    call(small_run_args(run, data, tok, "--set", "data.text_form=cls_sep", steps=2), tmp_path / "train.log")
    tag = run / "checkpoints" / "step_00000002"
    # make it an old run: neither its meta nor its config.yaml say anything about the form
    meta = json.loads((tag / "albef_meta.json").read_text())
    assert meta.pop("text_form") == "cls_sep"
    (tag / "albef_meta.json").write_text(json.dumps(meta))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["data"]["text_form"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))

    assert load_saved_config(run / "config.yaml").data.text_form == "cls_sep"
    with pytest.raises(ConfigError, match=BOTH):  # resumed with today's default
        check_resumable(tag, meta, load_saved_config(run / "config.yaml", ["data.text_form=cls_only"]), 1)
    check_resumable(tag, meta, load_saved_config(run / "config.yaml"), 1)

    init = resolve_init(str(run))  # the checkpoint, read in place: its meta names no form
    assert init == str(tag)
    quiet = dict(log=lambda *a: None)
    with pytest.raises(ConfigError, match=BOTH):
        build_model(load_saved_config(run / "config.yaml", ["data.text_form=cls_only",
                                                             f"checkpoint.init_from={init}"]), **quiet)
    call(["export", str(run)], tmp_path / "export.log")
    export = run / "exports" / "step_00000002"
    assert torch.load(export / "model.pt", weights_only=False)["text_form"] == "cls_sep"  # it says so
    # an old export: model.pt without the entry, config.yaml without the key
    old = tmp_path / "old_export"
    shutil.copytree(export, old)
    torch.save({"model": torch.load(old / "model.pt", weights_only=False)["model"]}, old / "model.pt")
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["data"]["text_form"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=BOTH):
        build_model(load_saved_config(run / "config.yaml", ["data.text_form=cls_only",
                                                             f"checkpoint.init_from={old / 'model.pt'}"]), **quiet)
    _, cfg = eval_retrieval.load_model(retrieval_args(old))  # evaluated in its own form
    assert cfg.data.text_form == "cls_sep"
    _, cfg = eval_retrieval.load_model(retrieval_args(run))
    assert cfg.data.text_form == "cls_sep"
