"""Engine set-up, schedules and checkpoint bookkeeping, without launching ranks."""
import json
import math

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.train.checkpoint import META, CheckpointError, CheckpointManager
from albef_ds.train.engines.deepspeed import load_ds_config, param_groups
from albef_ds.train.trainer import check_data_dirs
from albef_ds.objectives.base import alpha_at
from albef_ds.train.schedule import lr_at

from tests.support.checkpoints import FakeCollectives, broadcasts_of, fake_backend


def test_ds_config_filled_from_our_config():
    cfg = load_config("tiny", ["distributed.ds_config=ds_configs/zero3_bf16.json", "train.grad_clip=1.0",
                               "train.grad_accum_steps=2"], world_size=2)
    ds = load_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 2 * 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]


def test_unknown_ds_config_file_names_the_key_and_path():
    cfg = load_config("tiny", ["distributed.ds_config=ds_configs/nope.json"])
    with pytest.raises(ConfigError, match=r"distributed\.ds_config.*nope\.json"):
        load_ds_config(cfg, 1)


def test_batch_size_conflict_names_both_sides(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 1}}))
    cfg = load_config("tiny", [f"distributed.ds_config={path}"])
    with pytest.raises(ConfigError, match=r"train_batch_size.*999.*32"):
        load_ds_config(cfg, 1)


def test_precision_conflict_names_both_sides():
    cfg = load_config("tiny", ["distributed.ds_config=ds_configs/zero2_fp16.json", "train.precision=bf16"])
    with pytest.raises(ConfigError, match=r"train\.precision is bf16.*fp16"):
        load_ds_config(cfg, 1)


def test_optimizer_section_in_the_json_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        load_ds_config(load_config("tiny", [f"distributed.ds_config={path}"]), 1)


def test_queue_not_divisible_by_micro_batch_times_world():
    with pytest.raises(ConfigError, match=r"model\.queue_size.*32 x 3"):
        load_config("tiny", ["model.queue_size=1024"], world_size=3)


def test_missing_data_directory_names_the_key_and_path(tmp_path):
    cfg = load_config("tiny", [f"data.train_dirs=[{tmp_path / 'absent'}]", f"data.tokenizer={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.train_dirs.*absent"):
        check_data_dirs(cfg)


def test_no_weight_decay_on_biases_norms_and_scalars():
    from albef_ds.models import ALBEF
    model = ALBEF(load_config("tiny", ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1"]).model)
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    for p in no_decay["params"]:
        assert p.ndim <= 1 or names[id(p)].endswith(".bias"), names[id(p)]
    for p in decay["params"]:
        assert p.ndim >= 2, names[id(p)]
    assert any(names[id(p)] == "temp" for p in no_decay["params"])
    assert all(p.requires_grad for g in (decay, no_decay) for p in g["params"])


def test_lr_warmup_then_cosine_and_alpha_ramp():
    assert lr_at(0, 100, 1e-4, 1e-5, 1e-5, 10) == pytest.approx(1e-5)
    assert lr_at(5, 100, 1e-4, 1e-5, 1e-5, 10) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert lr_at(10, 100, 1e-4, 1e-5, 1e-5, 10) == pytest.approx(1e-4)
    assert lr_at(55, 100, 1e-4, 1e-5, 1e-5, 10) == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1e-4, 1e-5, 1e-5, 10) == pytest.approx(1e-5)
    assert alpha_at(0, 50, 0.4, 1.0) == 0.0
    assert alpha_at(25, 50, 0.4, 1.0) == pytest.approx(0.2)
    assert alpha_at(500, 50, 0.4, 1.0) == pytest.approx(0.4)


def test_a_crash_in_the_middle_of_a_save_never_becomes_latest(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    ckpt.save(fake_backend(), 4, {"global_batch": 8}, {"albef_rank00000.pt": {"rng": None}})
    # A write that fails: one line, the partial folder removed (a full disk needs the room back).
    with pytest.raises(CheckpointError, match=r"step_00000008 not saved: rank 0: .*disk full.*previous checkpoints"):
        ckpt.save(fake_backend(fail=True), 8, {"global_batch": 8}, {"albef_rank00000.pt": {"rng": None}})
    assert (ckpt.dir / "latest").read_text() == "step_00000004"
    assert ckpt.resolve("auto") == ckpt.dir / "step_00000004"
    assert not (ckpt.dir / "step_00000008").exists() and not (ckpt.dir / "step_00000008.partial").exists()
    # A save killed midway leaves a .partial folder: never a tag, never resumed from.
    partial = ckpt.dir / "step_00000008.partial"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_text("partial")
    assert ckpt.resolve("auto") == ckpt.dir / "step_00000004"
    with pytest.raises(CheckpointError, match="not a complete"):
        ckpt.resolve(str(partial))
    # The next successful save removes it; a save at that step never mixes in its files.
    (partial / "albef_rank00003.pt").write_text("stale, world 4")
    ckpt.save(fake_backend(), 8, {}, {"albef_rank00000.pt": {}})
    assert sorted(p.name for p in (ckpt.dir / "step_00000008").iterdir()) == [
        META, "albef_rank00000.pt", "mp_rank_00_model_states.pt"]
    assert not list(ckpt.dir.glob("*.partial"))


def test_ranks_that_see_different_latest_tags_cannot_load_different_steps(tmp_path):
    """Rank 1's view of the file system lacks step 8 (a caching shared file system): rank 0's
    choice is broadcast, rank 1 cannot see it, and every rank stops with the same error."""
    rank0_run, rank1_run = tmp_path / "view0", tmp_path / "view1"
    for run, steps in ((rank0_run, (4, 8)), (rank1_run, (4,))):
        ckpt = CheckpointManager(run, keep_last=5, rank=0, world_size=1)
        for step in steps:
            ckpt.save(fake_backend(), step, {}, {})
    chosen = CheckpointManager(rank0_run, 5, 0, 1).resolve("auto")
    assert chosen.name == "step_00000008"
    # Rank 1 is handed rank 0's path and record, but looks at the path through its own
    # (stale) view: no step 8 there (a copy of rank 0's run with step 8 gone).
    import shutil
    rank0_id = json.loads((chosen / META).read_text())["checkpoint_id"]
    stale = tmp_path / "stale"
    shutil.copytree(rank0_run, stale)
    shutil.rmtree(stale / "checkpoints" / "step_00000008")
    sent = broadcasts_of(CheckpointManager(rank0_run, 5, 0, 2), "auto")
    sent = [(e, [c.replace(str(rank0_run), str(stale)) for c in cands]) if i == 0 else (e, cands)
            for i, (e, cands) in enumerate(sent)]
    rank1 = CheckpointManager(stale, 5, rank=1, world_size=2,
                              collectives=FakeCollectives(None, lambda n, mine: rank0_id))
    rank1.comm.rank0_broadcasts = list(sent)
    with pytest.raises(CheckpointError, match=r"ranks disagree.*step 8.*\[1\] see \[None\]"):
        rank1.resolve("auto")
    # Rank 0 learns the same through the gather and stops too.
    rank0 = CheckpointManager(rank0_run, 5, rank=0, world_size=2,
                              collectives=FakeCollectives(None, lambda n, mine: mine))
    rank0.comm.all_gather_object = lambda mine: [mine, None]
    rank0.comm.broadcast_object = lambda obj, src=0: obj
    with pytest.raises(CheckpointError, match="ranks disagree"):
        rank0.resolve("auto")
    # Agreement: every rank resumes from rank 0's choice, not from its own newest.
    rank1_step4 = CheckpointManager(rank1_run, 5, 0, 2)
    sent = broadcasts_of(rank1_step4, str(rank1_run / "checkpoints" / "step_00000004"))
    agree = CheckpointManager(rank1_run, 5, rank=1, world_size=2,
                              collectives=FakeCollectives(None, lambda n, mine: mine))
    agree.comm.rank0_broadcasts = list(sent)
    assert agree.resolve(str(rank1_run / "checkpoints" / "step_00000004")).name == "step_00000004"


def test_keep_last_prunes_old_checkpoints_but_keeps_the_best(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (1, 2):
        ckpt.save(fake_backend(), step, {}, {})
    (tmp_path / "best.json").write_text(json.dumps({"tag": "step_00000001"}))
    for step in (3, 4, 5):
        ckpt.save(fake_backend(), step, {}, {"albef_rank00000.pt": {}})
    assert ckpt.complete_tags() == ["step_00000001", "step_00000004", "step_00000005"]
    assert torch.load(ckpt.dir / "step_00000005" / "albef_rank00000.pt", weights_only=False) == {}


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """Higher steps of another run in the folder (as --resume none used to leave them) sort
    as newer: the save just made must survive, 'latest' must name it, and auto-resume must
    not find the old run's."""
    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (100, 200, 300):
        ckpt.save(fake_backend(), step, {}, {})
    for step in (1, 2, 3):
        ckpt.save(fake_backend(), step, {}, {})
        latest = (ckpt.dir / "latest").read_text()
        assert latest == f"step_{step:08d}" and (ckpt.dir / latest / META).is_file()
        # nothing ahead of the new checkpoint is left for --resume auto or export to pick
        assert ckpt.resolve("auto") == ckpt.dir / f"step_{step:08d}"
    assert ckpt.complete_tags() == ["step_00000002", "step_00000003"]


@pytest.mark.slow
@pytest.mark.parametrize("ds_name", ["zero2_bf16.json", "zero3_bf16.json"])
def test_temperature_clamp_reaches_the_fp32_master(ds_name, monkeypatch):
    """The master is set past the bound (as a large step would); clamp_master brings the
    master itself back, and the next optimizer step copies it into the module."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param

    from albef_ds.distributed import init_distributed
    from albef_ds.models import ALBEF
    from albef_ds.train.engines.deepspeed import DeepSpeedEngine as DeepSpeedBackend, clamp_master
    # init_distributed exports RANK, MASTER_PORT, ...: undone after the test, or every later
    # subprocess of this session would take itself for rank 0 of this process's group.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    init_distributed("gloo")
    cfg = load_config("tiny", ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1",
                               "model.queue_size=64", "train.micro_batch_size=2", f"distributed.ds_config=ds_configs/{ds_name}"])
    engine = DeepSpeedBackend(ALBEF(cfg.model), cfg, 1, total_steps=4).engine
    temp = engine.module.temp
    if "zero3" in ds_name:
        from deepspeed.utils import safe_set_local_fp32_param
        safe_set_local_fp32_param(temp, torch.full_like(safe_get_local_fp32_param(temp), 0.6))
        read = lambda: safe_get_local_fp32_param(temp)  # noqa: E731
    else:
        safe_set_full_fp32_param(temp, torch.tensor([0.6]))
        read = lambda: safe_get_full_fp32_param(temp)  # noqa: E731
    assert read().max().item() == pytest.approx(0.6)
    clamp_master(temp, 0.001, 0.5)
    assert read().max().item() == pytest.approx(0.5)


def test_itm_lr_scale_gives_the_itm_path_its_own_rate_through_the_schedule():
    from albef_ds.models import ALBEF
    from albef_ds.train.engines.deepspeed import on_itm_path
    from albef_ds.train.schedule import lr_lambda
    cfg = load_config("tiny", ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1"])
    model = ALBEF(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(param_groups(model, 0.02, 1e-3, 1.0)) == 2  # the paper's single rate: as before
    groups = param_groups(model, 0.02, 1e-3, 5.0)
    scaled = [g for g in groups if "lr" in g]
    assert {g["lr"] for g in scaled} == {5e-3} and len(groups) == 4
    scaled_names = {names[id(p)] for g in scaled for p in g["params"]}
    assert "itm_head.weight" in scaled_names and any(".crossattention." in n for n in scaled_names)
    assert all(on_itm_path(names[id(p)]) for g in scaled for p in g["params"])
    assert not any(on_itm_path(names[id(p)]) for g in groups if "lr" not in g for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    is_scaled = ["lr" in g for g in groups]  # the optimizer fills every group's lr in
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, 1e-3, 1e-5, 1e-5, 10))
    for _ in range(30):
        opt.step()
        sched.step()
    rates = {(s, round(pg["lr"] / 1e-3, 9)) for s, pg in zip(is_scaled, opt.param_groups)}
    (plain,), (fast,) = {r for s, r in rates if not s}, {r for s, r in rates if s}
    assert fast == pytest.approx(5 * plain) and plain < 1.0  # the schedule moved both alike


def test_an_unknown_engine_is_refused_naming_the_key_and_the_choices():
    from albef_ds.config import ConfigError
    from albef_ds.train.engines import ENGINES, engine_class
    with pytest.raises(ConfigError, match=r"config key 'distributed.engine': unknown engine 'megatron'; "
                                          r"choose one of deepspeed, fsdp2"):
        engine_class("megatron")
    assert sorted(ENGINES) == ["deepspeed", "fsdp2"]
    assert engine_class("fsdp2").name == "fsdp2" and engine_class("deepspeed").name == "deepspeed"


def test_every_engine_answers_the_whole_protocol():
    """What the Trainer, EMA, checkpoint manager and export call, on each registered class."""
    from albef_ds.train.engines import ENGINES, Engine, engine_class
    wanted = [n for n in vars(Engine) if not n.startswith("_")] + \
        ["record", "record_reason", "convert_for_world", "consolidated_fp32_state", "release_local"]
    for name in ENGINES:
        cls = engine_class(name)
        missing = [n for n in wanted if n not in ("module", "dtype", "precision", "optimizer_name")
                   and not hasattr(cls, n)]
        assert missing == [], (name, missing)


def test_fsdp2_takes_its_precision_from_the_json_and_refuses_what_only_deepspeed_does():
    """One config trains in one precision on either engine ("auto": the JSON's); a ZeRO
    stage or an offload the fsdp2 engine cannot honour is refused by name, not ignored."""
    from albef_ds.config import ConfigError, load_config
    from albef_ds.train.engines.fsdp2 import precision_of

    def cfg(*sets):
        return load_config("tiny", ["distributed.engine=fsdp2", *sets])

    assert precision_of(cfg("distributed.ds_config=zero2_fp32")) == "fp32"
    assert precision_of(cfg("distributed.ds_config=zero2_bf16")) == "bf16"
    assert precision_of(cfg("distributed.ds_config=zero2_bf16", "train.precision=fp32")) == "fp32"
    with pytest.raises(ConfigError, match="'distributed.zero_stage': 3 is a DeepSpeed setting"):
        precision_of(cfg("distributed.zero_stage=3"))
    with pytest.raises(ConfigError, match="zero2_offload_bf16.json asks for offload_optimizer"):
        precision_of(cfg("distributed.ds_config=zero2_offload_bf16"))
    with pytest.raises(ConfigError, match="fp16 needs a loss scaler"):
        precision_of(cfg("distributed.ds_config=zero2_fp16"))
