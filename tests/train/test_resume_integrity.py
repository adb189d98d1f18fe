"""Resume integrity without launching ranks (the multi-rank runs: test_resume_runs.py and
test_scale_out.py): every setting applied or refused, damaged checkpoints found before
anything loads, sharded state assembled only when complete, universal conversions tied to
their source, saves durable and atomic, the job watchdog."""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from albef_ds.config import Config, ConfigError, load_config
from albef_ds.train import checkpoint as ckpt_lib
from albef_ds.train.checkpoint import META, CheckpointError, CheckpointManager
from albef_ds.train.resume_settings import APPLIED, REFUSED, all_keys, classify_changes

from tests.support.checkpoints import fake_backend

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- settings changed on resume

def test_every_config_key_is_either_applied_or_refused_on_resume():
    keys = set(all_keys(Config()))
    assert keys == set(APPLIED) | set(REFUSED), (keys ^ (set(APPLIED) | set(REFUSED)))
    assert not set(APPLIED) & set(REFUSED)


def test_a_changed_setting_is_applied_with_how_or_refused_naming_both_values():
    saved = load_config("tiny").to_dict()
    cfg = load_config("tiny", ["train.lr=2e-3", "train.weight_decay=0.05", "data.shuffle_seed=99",
                               "model.temp=0.1"])
    applied, refused = classify_changes(saved, cfg)
    assert applied == ["train.lr: 0.0005 -> 0.002: applied: the lr schedule is re-derived from the new values "
                       "from the resumed step on",
                       "train.weight_decay: 0.02 -> 0.05: applied: written into the optimizer's parameter groups "
                       "after the checkpoint loaded"]
    assert refused[0].startswith("model.temp: 0.07 in the checkpoint, 0.1 here")
    assert refused[1].startswith("data.shuffle_seed: 1234 in the checkpoint, 99 here (the loader's sample order")
    # A key the checkpoint's config lacks (an older albef-ds) counts as its default.
    del saved["train"]["lr"]
    assert classify_changes(saved, load_config("tiny", ["train.lr=3e-4"]))[0][0].startswith("train.lr: 0.0001 -> 0.0003")


def test_switching_the_itm_path_groups_on_resume_is_refused():
    saved = load_config("tiny").to_dict()
    _, refused = classify_changes(saved, load_config("tiny", ["train.itm_lr_scale=5"]))
    assert refused and refused[0].startswith("train.itm_lr_scale: 1.0 in the checkpoint, 5.0 here")
    saved["train"]["itm_lr_scale"] = 2.0
    applied, refused = classify_changes(saved, load_config("tiny", ["train.itm_lr_scale=5"]))
    assert not refused and applied[0].startswith("train.itm_lr_scale: 2.0 -> 5.0: applied")


def test_check_resumable_refuses_a_changed_zero_stage_and_vocabulary(tmp_path):
    cfg = load_config("tiny", ["distributed.ds_config=zero3_bf16"])
    record = {"global_batch": cfg.global_batch(1), "zero_stage": 2, "precision": "bf16", "config": cfg.to_dict(),
              "text_form": cfg.data.text_form}
    with pytest.raises(ConfigError, match=r"ZeRO stage 2 in the checkpoint, 3 here"):
        ckpt_lib.check_resumable(tmp_path, record, cfg, 1)

    class Vocab:
        def __init__(self, words):
            self.words = words

        def get_vocab(self):
            return {w: i for i, w in enumerate(self.words)}
    record = {**record, "zero_stage": 3, "vocabulary_sha256": ckpt_lib.vocabulary_digest(Vocab(["a", "b"]))}
    assert ckpt_lib.check_resumable(tmp_path, record, cfg, 1, Vocab(["a", "b"])) == []
    with pytest.raises(ConfigError, match=r"data.tokenizer: the vocabulary .* differs .* though of the same size"):
        ckpt_lib.check_resumable(tmp_path, record, cfg, 1, Vocab(["a", "c"]))


# ---------------------------------------------------------------------- damaged checkpoints

def _save(ckpt: CheckpointManager, step: int) -> Path:
    files = {"albef_rank00000.pt": {"rng": step, "ema_partitions": {}},
             "albef_momentum.pt": {"shapes": {"w": [2]}, "full": {"w": torch.full((2,), float(step))}},
             "albef_queue_pool00000.pt": {"queue_ptr": torch.tensor([step])}}
    return ckpt.save(fake_backend(), step, {"step": step}, files, {"pools": 1})


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":  # same size, one bit changed
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "garbage":
        path.write_bytes(b"{not json" + bytes(data[9:]))
    elif how == "delete":
        path.unlink()


def _digest(run: Path) -> dict:
    import hashlib
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, how", [
    ("albef_rank00000.pt", "truncate"), ("albef_momentum.pt", "flip"), ("albef_queue_pool00000.pt", "flip"),
    ("mp_rank_00_model_states.pt", "flip"), ("mp_rank_00_model_states.pt", "delete"), (META, "garbage"),
    (META, "delete")])
def test_a_damaged_file_falls_back_to_the_previous_checkpoint_naming_it(tmp_path, name, how):
    lines = []
    ckpt = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1, log=lines.append)
    _save(ckpt, 4)
    newest = _save(ckpt, 8)
    _damage(newest / name, how)
    before = _digest(tmp_path)
    if (name, how) == (META, "delete"):  # without its record, a folder is no checkpoint at all
        assert ckpt.resolve("auto").name == "step_00000004" and not lines
        return
    assert ckpt.resolve("auto").name == "step_00000004"
    assert any(line.startswith("WARNING: checkpoint step_00000008 skipped: ") and str(newest / name) in line
               for line in lines), lines
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest}: {newest / name}: .*nothing was loaded"):
        ckpt.resolve(str(newest))
    assert _digest(tmp_path) == before  # verification writes nothing


def test_no_intact_checkpoint_is_refused_not_started_afresh(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1, log=lambda line: None)
    _damage(_save(ckpt, 4) / "albef_rank00000.pt", "flip")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step_00000004: .*albef_rank00000.pt: "
                                              r"damaged"):
        ckpt.resolve("auto")


def test_a_checkpoint_without_a_file_record_cannot_be_verified_and_is_refused(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1, log=lambda line: None)
    tag = _save(ckpt, 4)
    record = json.loads((tag / META).read_text())
    del record["files"]
    (tag / META).write_text(json.dumps(record))  # as an albef-ds before the record wrote it
    with pytest.raises(CheckpointError, match=r"albef_meta.json: no file record .* cannot be checked"):
        ckpt.resolve(str(tag))


def test_the_commit_record_holds_sizes_and_crcs_of_every_file(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    tag = _save(ckpt, 4)
    record = json.loads((tag / META).read_text())
    on_disk = sorted(p.name for p in tag.iterdir() if p.name != META)
    assert sorted(record["files"]) == on_disk
    import zlib
    for name, (size, crc) in record["files"].items():
        assert size == (tag / name).stat().st_size and crc == zlib.crc32((tag / name).read_bytes())
    assert record["world_size"] == 1 and record["step"] == 4 and len(record["checkpoint_id"]) == 32


def test_every_file_is_fsynced_before_the_commit_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    tag = _save(ckpt, 4)
    commit = events.index(("replace", str(tag) + ".partial"))
    synced = {Path(p).name for kind, p in events[:commit] if kind == "fsync"}
    assert set(json.loads((tag / META).read_text())["files"]) | {tag.name + ".partial"} <= synced
    assert any(name.startswith(META + ".tmp") for name in synced)  # the record, before its own rename
    assert ("fsync", str(ckpt.dir)) in events[commit:]  # the rename itself


def test_a_damaged_best_json_is_named_not_a_crash_in_the_pruning(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=1)
    _save(ckpt, 4)
    (tmp_path / "best.json").write_text('{"tag": "step_000')  # as a non-atomic write cut short left it
    with pytest.raises(CheckpointError, match=r"best.json: unreadable"):
        _save(ckpt, 8)


# ---------------------------------------------------------------------- sharded momentum master

def test_the_momentum_master_is_assembled_only_from_every_partition():
    from albef_ds.train.ema import assemble_full
    full = {"shapes": {"w": [10], "b": [3]}, "full": {"b": torch.ones(3)}}
    parts = [{"w": (r * 4, torch.arange(r * 4, r * 4 + 4, dtype=torch.float32))} for r in range(3)]  # 12 >= 10
    assert torch.equal(assemble_full(full, iter(parts))["w"], torch.arange(10, dtype=torch.float32))
    with pytest.raises(CheckpointError, match=r"momentum master of w: elements 8.. of 10 .*albef_rank00002.pt"):
        assemble_full(full, iter(parts[:2]))  # the last rank's file missing
    with pytest.raises(CheckpointError, match=r"elements 4.. of 10 .*albef_rank00001.pt"):
        assemble_full(full, iter([parts[0], {}, parts[2]]))  # a rank file without its partition
    with pytest.raises(CheckpointError, match=r"in two rank files"):
        assemble_full(full, iter([parts[0], parts[0] | {}, parts[1], parts[2]]))


def test_rank_files_are_those_of_the_recorded_world_and_a_missing_one_is_named(tmp_path):
    (tmp_path / META).write_text(json.dumps({"world_size": 3}))
    for r in (0, 2):
        torch.save({"ema_partitions": {}}, tmp_path / ckpt_lib.rank_file_name(r))
    files = ckpt_lib.rank_files(tmp_path)
    assert next(files) == {"ema_partitions": {}}
    with pytest.raises(CheckpointError, match=r"albef_rank00001.pt: missing"):
        next(files)


# ---------------------------------------------------------------------- universal conversions

@pytest.fixture
def converter(monkeypatch):
    """backend.to_universal replaced by a recorder that writes a marker file (or fails)."""
    calls = []

    def to_universal(tag_dir, out):
        calls.append((Path(tag_dir), Path(out)))
        if getattr(to_universal, "fail", False):
            (Path(out) / "zero").mkdir(parents=True)
            raise RuntimeError("ds_to_universal exited 1: interrupted")
        (Path(out) / "zero").mkdir(parents=True)
        (Path(out) / "zero" / "made_from").write_text((Path(tag_dir) / META).read_text())
    import albef_ds.train.engines.deepspeed as backend
    monkeypatch.setattr(backend, "to_universal", to_universal)
    to_universal.calls = calls
    return to_universal


def test_a_universal_conversion_is_tied_to_its_source_and_rebuilt_when_stale_or_incomplete(tmp_path, converter):
    source = CheckpointManager(tmp_path / "source", keep_last=3, rank=0, world_size=1)
    tag = _save(source, 8)
    resuming = CheckpointManager(tmp_path / "resuming", keep_last=3, rank=0, world_size=1, log=lambda line: None)
    record = json.loads((tag / META).read_text())
    out = resuming.prepare_universal(tag, record)
    assert out == tmp_path / "resuming" / "checkpoints" / "universal" / "step_00000008"
    assert len(converter.calls) == 1 and not (tmp_path / "source" / "checkpoints" / "universal").exists()
    # The same checkpoint again: reused.
    assert resuming.prepare_universal(tag, record) == out and len(converter.calls) == 1
    # The source re-saved at that step (another id): the old conversion is stale, rebuilt.
    tag = _save(source, 8)
    record = json.loads((tag / META).read_text())
    resuming.prepare_universal(tag, record)
    assert len(converter.calls) == 2
    assert json.loads((out / "zero" / "made_from").read_text())["checkpoint_id"] == record["checkpoint_id"]
    # An incomplete one (no source marker, as an older albef-ds's interrupted conversion) and
    # a leftover temporary folder: rebuilt, removed.
    (out / ckpt_lib.UNIVERSAL_SOURCE).unlink()
    leftover = out.parent / ".step_00000008.tmp999"
    (leftover / "zero").mkdir(parents=True)
    resuming.prepare_universal(tag, record)
    assert len(converter.calls) == 3 and not leftover.exists()
    # A conversion that fails: one error, and no folder that a retry would take as done.
    (out / ckpt_lib.UNIVERSAL_SOURCE).unlink()
    converter.fail = True
    with pytest.raises(CheckpointError, match=r"converting .*step_00000008 to a universal checkpoint failed: .*"
                                              r"interrupted"):
        resuming.prepare_universal(tag, record)
    assert ckpt_lib._universal_source(out) is None
    converter.fail = False
    resuming.prepare_universal(tag, record)
    assert ckpt_lib._universal_source(out) == record["checkpoint_id"]
    # The resumed run's first save removes the conversion (it has a checkpoint of its own world now).
    _save(resuming, 9)
    assert not (tmp_path / "resuming" / "checkpoints" / "universal").exists()


# ---------------------------------------------------------------------- the run directory's lock

def test_a_file_system_without_flock_is_refused_with_one_line(tmp_path, monkeypatch):
    import fcntl

    from albef_ds.distributed import LaunchEnv
    from albef_ds.errors import UsageError
    from albef_ds.train.trainer import _claim_run_dir

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    cfg = load_config("tiny", [f"logging.run_dir={tmp_path / 'run'}"])
    with pytest.raises(UsageError, match=r"cannot lock .*\.lock: Function not implemented \(ENOSYS\): the file "
                                         r"system does not support flock"):
        _claim_run_dir(cfg, LaunchEnv(0, 0, 1, 1, "127.0.0.1", 1, "python"), "auto", False)


# ---------------------------------------------------------------------- the job watchdog

@pytest.mark.slow
def test_a_failure_published_by_one_rank_ends_another_within_seconds(tmp_path):
    """Rank 1 is stuck (its main thread asleep, as in a collective or a barrier); rank 0 fails
    and publishes it through the store: rank 1 releases what it holds and ends itself."""
    from datetime import timedelta
    port_store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10),
                                            wait_for_workers=False)
    released = tmp_path / "released"
    child = subprocess.Popen([sys.executable, "-c", f"""
import time, torch
from datetime import timedelta
from albef_ds.train.watchdog import JobWatchdog
store = torch.distributed.TCPStore("127.0.0.1", {port_store.port}, is_master=False, timeout=timedelta(seconds=10))
JobWatchdog(store, rank=1, world_size=2, poll_s=0.2,
            on_exit=lambda: open({str(released)!r}, "w").write("yes")).start()
print("watching", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    from albef_ds.train.watchdog import JobWatchdog
    started = time.time()
    JobWatchdog(port_store, rank=0, world_size=2, poll_s=0.2).fail("RuntimeError: disk on fire")
    code = child.wait(timeout=30)
    assert time.time() - started < 10 and code == 1
    assert "rank 1 ends: another rank failed (rank 0: RuntimeError: disk on fire)" in child.stderr.read()
    assert released.read_text() == "yes"


@pytest.mark.slow
def test_a_rank_that_loses_rank_0s_store_ends_too(tmp_path):
    from datetime import timedelta
    server = subprocess.Popen([sys.executable, "-c", """
import time, torch
from datetime import timedelta
s = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
print(s.port, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    child = subprocess.Popen([sys.executable, "-c", f"""
import time, torch
from datetime import timedelta
from albef_ds.train.watchdog import JobWatchdog
store = torch.distributed.TCPStore("127.0.0.1", {port}, is_master=False, timeout=timedelta(seconds=10))
JobWatchdog(store, rank=1, world_size=2, poll_s=0.2, lost_store_grace_s=1.0).start()
print("watching", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    server.kill()  # rank 0 is SIGKILLed: it publishes nothing
    server.wait()
    assert child.wait(timeout=30) == 1
    assert "lost rank 0's store" in child.stderr.read()
    del timedelta


# ---------------------------------------------------------------------- the engine on resume (in-process DeepSpeed)

@pytest.fixture
def process_group(monkeypatch):
    """A 1-rank process group in this process (as tests/train/test_engine_setup.py's)."""
    from albef_ds.distributed import init_distributed
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    init_distributed("gloo")


SMALL = ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1", "model.queue_size=64",
         "train.micro_batch_size=2", "train.warmup_steps=2", "train.min_lr=1e-5", "train.warmup_lr=1e-5"]


@pytest.mark.slow
def test_changed_optimizer_settings_are_written_over_the_checkpoints(process_group, tmp_path):
    """DeepSpeed restores the saved base rates, weight decay and betas; a resume with new
    values must train with the new ones (it logged the old schedule before)."""
    import math

    from albef_ds.models import ALBEF
    from albef_ds.train.engines.deepspeed import DeepSpeedEngine as DeepSpeedBackend
    old = load_config("tiny", SMALL + ["distributed.ds_config=zero2_fp32", "train.lr=1e-3"])
    first = DeepSpeedBackend(ALBEF(old.model), old, 1, total_steps=10)
    for _ in range(3):
        first.engine.lr_scheduler.step()
    first.save_checkpoint(tmp_path, "tag", {"step": 3})
    new = load_config("tiny", SMALL + ["distributed.ds_config=zero2_fp32", "train.lr=2e-3",
                                       "train.weight_decay=0.05", "train.betas=[0.8, 0.99]"])
    second = DeepSpeedBackend(ALBEF(new.model), new, 1, total_steps=12)
    second.load_checkpoint(tmp_path / "tag")
    groups = second.engine.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.02}  # what DeepSpeed restored: the saved values
    second.apply_settings(new, total_steps=12)
    # warm-up over 2 steps, then cosine from 2e-3 to 1e-5 over the remaining 10, at step 3
    want = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * (3 - 2) / (12 - 2)))
    assert [g["lr"] for g in groups] == pytest.approx([want] * len(groups), rel=1e-12)
    assert second.lr() == pytest.approx(want, rel=1e-12)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05] and {g["betas"] for g in groups} == {(0.8, 0.99)}
    second.engine.lr_scheduler.step()  # and the schedule goes on from the new base
    step4 = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * (4 - 2) / (12 - 2)))
    assert second.lr() == pytest.approx(step4, rel=1e-12)


@pytest.mark.slow
def test_the_temperature_is_read_when_zero3_partitions_every_parameter(process_group, tmp_path):
    """stage3_param_persistence_threshold 0: temp itself is partitioned, and reading it
    outside the forward crashed the first log line."""
    from albef_ds.models import ALBEF
    from albef_ds.train.engines.deepspeed import DeepSpeedEngine as DeepSpeedBackend
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    cfg = load_config("tiny", SMALL + [f"distributed.ds_config={ds}", "train.precision=fp32"])
    backend = DeepSpeedBackend(ALBEF(cfg.model), cfg, 1, total_steps=4)
    assert backend.module.temp.numel() == 0  # partitioned: nothing to read in place
    assert backend.scalar(backend.module.temp) == pytest.approx(0.07)
