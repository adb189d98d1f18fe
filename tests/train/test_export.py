"""Exports (issue 15): in RUN/exports/step_N (outside checkpoints/, which rotation
prunes), with the tokenizer, and a config of absolute paths: an export evaluates from any
directory after every checkpoint is gone."""
import json
import os
from pathlib import Path

import pytest

from tests.support.launch import in_process
from tests.support.runs import small_run_args

pytestmark = pytest.mark.slow


def call(args, log: Path, cwd: Path) -> tuple[int, str]:
    """``albef-ds ARGS`` on one rank, in-process, from ``cwd`` (relative paths resolve there)."""
    code, text = in_process(args, log, cwd=cwd)
    assert code == 0, text[-4000:]
    return code, text


def test_an_export_survives_rotation_and_evaluates_from_another_directory(synth_data, tmp_path):
    """The run is started from one directory with relative paths; the export is evaluated
    from another after every checkpoint is gone, the tokenizer folder moved away too."""
    import shutil
    data, tok = synth_data
    start_dir = tmp_path / "start"
    start_dir.mkdir()
    tok_copy = tmp_path / "tok_copy"  # removed below: the export must carry its own
    shutil.copytree(tok, tok_copy)
    rel_data, rel_tok = Path(os.path.relpath(data, start_dir)), Path(os.path.relpath(tok_copy, start_dir))
    call(small_run_args("run", rel_data, rel_tok, steps=4), tmp_path / "train.log", cwd=start_dir)
    run = start_dir / "run"
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == str(tok_copy) and saved["data"]["train_dirs"] == [str(data / "train")]
    assert saved["logging"]["run_dir"] == str(run)

    _, text = call(["export", "run"], tmp_path / "export.log", cwd=start_dir)
    export = run / "exports" / "step_00000004"
    assert {"model.pt", "albef.pth", "config.yaml", "tokenizer"} <= {p.name for p in export.iterdir()}
    assert yaml.safe_load((export / "config.yaml").read_text())["data"]["tokenizer"] == str(export / "tokenizer")

    # rotation/deletion of the checkpoints, and the original tokenizer gone
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(tok_copy)
    from albef_ds.train.export import load_exported
    model, cfg = load_exported(export)
    assert cfg.data.tokenizer == str(export / "tokenizer")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel_export = os.path.relpath(export, elsewhere)
    _, text = call(["eval-retrieval", "--model", rel_export,
                    "--split", str(data / "test.json"), "--max-images", "10", "--k", "4",
                    "--out", "eval"], tmp_path / "eval.log", cwd=elsewhere)
    result = json.loads((elsewhere / "eval" / "retrieval.json").read_text())
    assert result["num_images"] == 10 and "chance" in text and "nan" not in text


def test_the_tokenizer_of_init_weights_is_found_where_each_kind_keeps_it(tmp_path):
    """finetune --init's tokenizer (used when the config names none): an export's own copy,
    a run's or a checkpoint's config.yaml's folder; none for a reference .pth or a folder
    that has gone."""
    from albef_ds.config import load_config, save_config
    from albef_ds.train.export import init_tokenizer
    tok = tmp_path / "tok"
    tok.mkdir()
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    cfg = load_config("tiny", [f"data.tokenizer={tok}"])
    save_config(cfg, run / "config.yaml")
    export = tmp_path / "export"
    (export / "tokenizer").mkdir(parents=True)
    (export / "model.pt").write_bytes(b"")
    save_config(cfg, export / "config.yaml")
    (tmp_path / "ALBEF.pth").write_bytes(b"")
    assert init_tokenizer(str(run)) == str(tok)
    assert init_tokenizer(str(run / "checkpoints" / "step_00000002")) == str(tok)
    assert init_tokenizer(str(export)) == str((export / "tokenizer").absolute())
    assert init_tokenizer(str(export / "model.pt")) == str((export / "tokenizer").absolute())
    assert init_tokenizer(str(tmp_path / "ALBEF.pth")) is None
    tok.rmdir()
    assert init_tokenizer(str(run)) is None
