"""The typed config: presets, `--set` overrides, errors that name the key, round trip."""
import dataclasses

import pytest
import yaml

from albef_ds.config import (Config, ConfigError, load_config, parse_overrides, save_config)


def write_yaml(path, values: dict):
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- presets

def test_albef_base_preset_is_the_papers_recipe():
    cfg = load_config("albef-base", world_size=8)  # 64 per GPU x 8 GPUs = 512
    m, t = cfg.model, cfg.train
    assert (m.image_res, m.patch_size, m.vision_width, m.vision_depth, m.vision_heads) == (256, 16, 768, 12, 12)
    assert (m.vocab_size, m.text_width, m.text_depth, m.text_heads, m.fusion_layer) == (30522, 768, 12, 12, 6)
    assert (m.embed_dim, m.queue_size, m.momentum, m.temp, m.alpha) == (256, 65536, 0.995, 0.07, 0.4)
    assert m.mlm_probability == 0.15
    assert (t.micro_batch_size, t.epochs, t.lr, t.min_lr, t.weight_decay) == (64, 30, 1e-4, 1e-5, 0.02)
    assert cfg.global_batch(8) == 512


def test_tiny_preset_loads_and_is_small():
    cfg = load_config("tiny")
    assert isinstance(cfg, Config)
    m = cfg.model
    assert m.fusion_layer < m.text_depth and m.image_res % m.patch_size == 0
    assert m.queue_size % cfg.train.micro_batch_size == 0
    assert m.vision_width <= 256 and m.text_width <= 256


def test_a_config_file_by_path(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"model": {"queue_size": 128}, "train": {"micro_batch_size": 16}})
    cfg = load_config(str(path))
    assert cfg.model.queue_size == 128 and cfg.train.micro_batch_size == 16
    assert cfg.model.vision_width == Config().model.vision_width  # untouched keys: defaults


def test_a_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="no-such-preset"):
        load_config("no-such-preset")


# ----------------------------------------------------------------------------- overrides

def test_overrides_parse_with_yaml_types():
    parsed = parse_overrides(["model.queue_size=4096", "model.sdpa=false", "model.temp=0.05",
                              "data.train_dirs=[/a, /b]", "checkpoint.init_from=null",
                              "logging.run_dir=runs/x=y"])
    assert parsed == {"model": {"queue_size": 4096, "sdpa": False, "temp": 0.05},
                      "data": {"train_dirs": ["/a", "/b"]}, "checkpoint": {"init_from": None},
                      "logging": {"run_dir": "runs/x=y"}}  # split at the first '=' only
    assert type(parsed["model"]["queue_size"]) is int and type(parsed["model"]["sdpa"]) is bool


def test_overrides_apply_over_the_file_with_the_field_types():
    cfg = load_config("tiny", ["model.queue_size=64", "train.micro_batch_size=8", "model.sdpa=false",
                               "train.lr=1e-3", "train.grad_clip=1", "data.train_dirs=[/a, /b]",
                               "data.val_dir=/val", "train.max_steps=100"])
    assert cfg.model.queue_size == 64 and type(cfg.model.queue_size) is int
    assert cfg.model.sdpa is False
    # YAML 1.1 reads 1e-3 as a string and 1 as an int: both become the float the field wants
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.grad_clip == 1.0 and type(cfg.train.grad_clip) is float
    assert cfg.data.train_dirs == ["/a", "/b"] and cfg.data.val_dir == "/val"
    assert cfg.train.max_steps == 100
    # the rest of the preset is kept
    assert cfg.model.vision_width == load_config("tiny").model.vision_width


@pytest.mark.parametrize("item", ["model.queue_size", "queue_size=4", "model.queue.size=4"])
def test_malformed_overrides_are_errors(item):
    with pytest.raises(ConfigError):
        load_config("tiny", [item])


# ----------------------------------------------------------------------------- errors

def test_unknown_key_in_a_file_names_key_file_and_closest_key(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", {"model": {"queue_sise": 64}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert "model.queue_sise" in message
    assert str(path) in message
    assert "model.queue_size" in message


def test_unknown_section_names_the_closest_section(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", {"modle": {"queue_size": 64}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "modle" in str(err.value) and "'model'" in str(err.value) and str(path) in str(err.value)


def test_unknown_override_key_names_the_command_line_and_closest_key():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.micro_batchsize=8"])
    message = str(err.value)
    assert "train.micro_batchsize" in message and "--set" in message
    assert "train.micro_batch_size" in message


@pytest.mark.parametrize("item,key", [
    ("model.queue_size=abc", "model.queue_size"),
    ("model.queue_size=true", "model.queue_size"),  # a bool is not an int
    ("model.queue_size=1.5", "model.queue_size"),
    ("model.sdpa=3", "model.sdpa"),
    ("train.lr=fast", "train.lr"),
    ("model.vision_width=null", "model.vision_width"),
    ("train.epochs=[1, 2]", "train.epochs"),
])
def test_wrong_type_names_the_key(item, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [item])
    assert key in str(err.value)


def test_wrong_type_in_a_file_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"model": {"queue_size": "many"}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "model.queue_size" in str(err.value) and str(path) in str(err.value)


def test_queue_not_a_multiple_of_the_global_micro_batch_names_model_queue_size():
    with pytest.raises(ConfigError, match="model.queue_size"):
        load_config("tiny", ["model.queue_size=1000", "train.micro_batch_size=32"])
    # a multiple of the micro-batch alone is not enough: the world size counts too
    load_config("tiny", ["model.queue_size=1024", "train.micro_batch_size=32"], world_size=4)
    with pytest.raises(ConfigError, match="model.queue_size"):
        load_config("tiny", ["model.queue_size=1024", "train.micro_batch_size=32"], world_size=3)


@pytest.mark.parametrize("fusion_layer", [5, -1])
def test_fusion_layer_beyond_the_depth_names_the_key(fusion_layer):
    with pytest.raises(ConfigError, match="model.fusion_layer"):
        load_config("tiny", ["model.text_depth=4", f"model.fusion_layer={fusion_layer}"])
    # the depth itself is allowed: no fusion layers
    load_config("tiny", ["model.text_depth=4", "model.fusion_layer=4"])


# ----------------------------------------------------------------------------- round trip

def test_save_then_load_round_trips_to_an_equal_config(tmp_path):
    cfg = load_config("tiny", ["model.queue_size=64", "train.micro_batch_size=8", "train.lr=3e-4",
                               "data.train_dirs=[/a, /b]", "data.train_weights=[0.25, 0.75]",
                               "checkpoint.init_from=/w.pth", "model.sdpa=false"])
    path = tmp_path / "nested" / "config.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # every field is written, defaults included
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section in dataclasses.fields(Config):
        names = {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
        assert set(saved[section.name]) == names
    # and a second save writes the same text
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_default_config_round_trips(tmp_path):
    cfg = load_config("albef-base")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_recipe_global_batch_warns_and_scales_the_lr_linearly_when_asked():
    from albef_ds.config import load_config
    cfg = load_config("albef-base", world_size=16)  # 16 x 64 = 1024 pairs, the recipe is 512
    assert "WARNING: global batch 1024 differs from the recipe's 512" in cfg.recipe_note(16)
    assert cfg.train.lr == 1e-4
    scaled = load_config("albef-base", ["train.lr_scaling=linear"], world_size=16)
    assert "x2" in scaled.recipe_note(16) and scaled.train.lr == pytest.approx(2e-4)
    assert scaled.train.min_lr == pytest.approx(2e-5)
    assert load_config("albef-base", world_size=8).recipe_note(8) is None


def test_negative_pool_must_divide_the_world():
    from albef_ds.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.negative_pool.*3 ranks do not divide the world size 8"):
        load_config("albef-base", ["model.negative_pool=3"], world_size=8)
    with pytest.raises(ConfigError, match="model.negative_pool"):
        load_config("albef-base", ["model.negative_pool=some"], world_size=8)
    assert load_config("albef-base", world_size=64).pool_size(64) == 8
    assert load_config("albef-base", world_size=2).pool_size(2) == 2


def test_itm_recipe_switches_are_checked_and_default_to_the_paper():
    cfg = load_config("tiny")
    assert cfg.model.itm_random_negatives == 0.0 and cfg.train.itm_lr_scale == 1.0
    with pytest.raises(ConfigError, match="model.itm_random_negatives"):
        load_config("tiny", ["model.itm_random_negatives=1.5"])
    with pytest.raises(ConfigError, match="train.itm_lr_scale"):
        load_config("tiny", ["train.itm_lr_scale=0"])


def test_binding_switches_are_checked_and_default_to_the_paper():
    cfg = load_config("albef-base")
    assert cfg.model.itm_pool == "cls" and cfg.model.vision_pos_init == "normal"
    with pytest.raises(ConfigError, match="model.itm_pool"):
        load_config("tiny", ["model.itm_pool=max"])
    with pytest.raises(ConfigError, match="model.vision_pos_init"):
        load_config("tiny", ["model.vision_pos_init=zeros"])
