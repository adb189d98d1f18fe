"""Resume integrity end to end (issue 27): real DeepSpeed engines on 1 and 2 CPU ranks.

Runs (each once; ZeRO-2 fp32, global batch 16):
  a   a copy of the session's z2_w2 run with its step-4 and step-8 checkpoints
  b1  run B, 1 rank (in-process), resumes A's step 8 and stops there: a universal
      conversion in B
  a2  run A, 2 ranks, from its step 4 with another seed and lr: step 8 saved anew
  b2  run B again (in-process) from A's step 8: its conversion is stale (and an interrupted
      one lies beside it): rebuilt
  c1  run C, a copy of A after a2 with a truncated rank file in step 8: asked for by path
      (in-process), refused
  c2  run C with --resume auto, 2 ranks: falls back to step 4 and must continue as a2 did
The in-process tests of the same machinery: test_resume_integrity.py.
"""
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.launch import albef_command, call, in_process
from tests.support.runs import keys, per_step, pretrain_args

pytestmark = pytest.mark.slow

Z2 = ["--set", "distributed.ds_config=ds_configs/zero2_fp32.json"]
#: a2's changes (c2 repeats them): a seed and an lr the checkpoint was not trained with
CHANGED = ["--set", "train.seed=7", "--set", "train.lr=2e-3"]


def _digest(run: Path) -> dict:
    """Every file of the run but the lock (which names whoever last held it)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def _resume_runs(runs):
    data, tok = runs.data, runs.tok
    root = runs.root / "resume_runs"
    root.mkdir()
    a, b, c = root / "a", root / "b", root / "c"
    step = lambda run, n: str(run / "checkpoints" / f"step_{n:08d}")  # noqa: E731
    out = {"root": root, "a": a, "b": b, "c": c}
    source = runs.get("z2_w2").dir
    shutil.copytree(source, a, ignore=lambda d, names: [n for n in names if n.startswith("step_") and
                                                        n not in ("step_00000004", "step_00000008")])
    out["a_step8_first_id"] = json.loads((a / "checkpoints" / "step_00000008" / "albef_meta.json").read_text())[
        "checkpoint_id"]

    def one_rank(run_dir, extra, log):
        code, text = in_process(pretrain_args(run_dir, data, tok, 1, 8, Z2 + extra), root / log)
        assert code == 0, text[-5000:]
    one_rank(b, ["--resume", step(a, 8)], "b1.log")
    out["universal_folders_in_a"] = sorted(p.name for p in (a / "checkpoints").iterdir() if "universal" in p.name)
    call(albef_command(2, pretrain_args(a, data, tok, 2, 8, Z2 + CHANGED + ["--resume", step(a, 4)])),
         root / "a2.log")
    leftover = b / "checkpoints" / "universal" / ".step_00000008.tmp999" / "zero"
    leftover.mkdir(parents=True)  # an interrupted conversion's temporary folder
    out["leftover"] = leftover.parent
    one_rank(b, ["--resume", step(a, 8)], "b2.log")

    shutil.copytree(a, c)
    rank_file = c / "checkpoints" / "step_00000008" / "albef_rank00001.pt"
    with open(rank_file, "r+b") as f:
        f.truncate(rank_file.stat().st_size // 2)
    out["damaged"] = rank_file
    out["c_before"] = _digest(c)
    out["c1"] = in_process(pretrain_args(c, data, tok, 1, 8, Z2 + CHANGED + ["--resume", step(c, 8)]))
    out["c_after_refusal"] = _digest(c)
    call(albef_command(2, pretrain_args(c, data, tok, 2, 8, Z2 + CHANGED + ["--resume", "auto"])), root / "c2.log")
    return out


@pytest.fixture(scope="module")
def resumed(runs):
    return runs.once("resume_runs", _resume_runs)


def _tensors(folder: Path) -> dict:
    """relative path -> loaded object of every .pt file under ``folder``."""
    return {str(p.relative_to(folder)): torch.load(p, map_location="cpu", weights_only=False)
            for p in sorted(folder.rglob("*.pt"))}


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y))
    if type(x).__eq__ is object.__eq__ and hasattr(x, "__dict__"):  # e.g. DeepSpeed's LossScaler
        return type(x) is type(y) and _equal(vars(x), vars(y))
    return x == y


def test_a_stale_universal_conversion_is_rebuilt_and_equals_a_fresh_one(resumed, tmp_path):
    a8 = resumed["a"] / "checkpoints" / "step_00000008"
    record = json.loads((a8 / "albef_meta.json").read_text())
    assert record["checkpoint_id"] != resumed["a_step8_first_id"]  # a2 saved step 8 anew
    log = (resumed["root"] / "b2.log").read_text()
    assert f"stale: made from checkpoint id {resumed['a_step8_first_id'][:8]}, not {record['checkpoint_id'][:8]}" in log
    assert "world 2 -> 1, universal" in log
    conversion = resumed["b"] / "checkpoints" / "universal" / "step_00000008"
    assert json.loads((conversion / "albef_universal_source.json").read_text())["checkpoint_id"] == \
        record["checkpoint_id"]
    assert not resumed["leftover"].exists()
    # Kept out of the source run: A's checkpoints hold no conversion.
    assert resumed["universal_folders_in_a"] == [] and not list((resumed["a"] / "checkpoints").glob("*universal*"))
    # Bit for bit what a fresh conversion of A's step 8 gives.
    from albef_ds.train.engines.deepspeed import to_universal
    to_universal(a8, tmp_path / "fresh")
    got, want = _tensors(conversion), _tensors(tmp_path / "fresh")
    assert got.keys() == want.keys() and len(got) > 10
    assert all(_equal(got[k], want[k]) for k in want), [k for k in want if not _equal(got[k], want[k])][:5]


def test_an_lr_changed_on_resume_is_followed_from_the_next_step(resumed):
    log = (resumed["root"] / "a2.log").read_text()
    assert "\n  train.lr: 0.001 -> 0.002: applied: the lr schedule is re-derived" in log
    assert "\n  train.seed: 42 -> 7: applied" in log
    rows = per_step(resumed["a"])
    for s in range(5, 9):  # warm-up 2 steps, cosine to min_lr 1e-5 at step 8; logged after step s
        want = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * (s - 2) / (8 - 2)))
        assert rows[s]["lr"] == pytest.approx(want, rel=1e-6), (s, rows[s]["lr"], want)


def test_a_damaged_checkpoint_is_refused_by_path_and_skipped_by_auto(resumed):
    code, text = resumed["c1"]
    assert code == 2, text[-3000:]
    assert f"checkpoint {resumed['damaged'].parent}: {resumed['damaged']}: " in text and "truncated" in text
    assert resumed["c_after_refusal"] == resumed["c_before"]  # config.yaml, .shm, metrics: byte-identical
    log = (resumed["root"] / "c2.log").read_text()
    assert f"WARNING: checkpoint step_00000008 skipped: {resumed['damaged']}: " in log
    assert "resumed from" in log and "step_00000004 at step 4" in log


def test_the_fallback_continues_bit_identically_to_a_resume_from_that_checkpoint(resumed):
    ref, got = per_step(resumed["a"]), per_step(resumed["c"])  # a2 resumed step 4 with the same changes
    for s in range(5, 9):
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "lr"):
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])
    for rank in (0, 1):
        k_ref, k_got = keys(resumed["a"], rank), keys(resumed["c"], rank)
        later = [sk for sk in k_ref if sk[0] >= 4]
        assert later and all(k_got[sk] == k_ref[sk] for sk in later)


def test_a_full_disk_gives_one_line_with_enospc_and_the_previous_checkpoint_resumes(synth_data, tmp_path):
    """A small tmpfs run directory: step 4's checkpoint fits, step 8's does not (1 rank,
    in-process: a save's failure path is the same on every rank)."""
    data, tok = synth_data
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        run = mnt / "run"
        args = pretrain_args(run, data, tok, 1, 8, Z2 + ["--set", "logging.log_sample_keys=false"])
        code, text = in_process(args)
        assert code == 2, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("albef-ds pretrain: error:")]
        assert len(errors) == 1 and "ENOSPC" in errors[0], text[-3000:]
        assert f"{run}/checkpoints/step_00000008.partial" in errors[0]
        assert "Traceback" not in text
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004"]
        subprocess.run(["mount", "-o", "remount,size=80m", str(mnt)], check=True)
        code, text = in_process(args)
        assert code == 0 and "step_00000004 at step 4" in text, text[-3000:]
        assert sorted(per_step(run)) == list(range(1, 9))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
