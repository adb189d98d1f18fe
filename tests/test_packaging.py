"""Presets and DeepSpeed configs found by name, and a wheel that works outside the checkout."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from albef_ds.config import ConfigError
from albef_ds.presets import config_path, ds_config_path, shipped

REPO = Path(__file__).resolve().parents[1]


def test_presets_and_ds_configs_by_name_and_by_the_old_spellings():
    assert config_path("tiny").read_text() == (REPO / "configs" / "tiny.yaml").read_text()
    assert config_path("albef-base.yaml").name == "albef-base.yaml"
    for spelling in ("zero2_bf16", "zero2_bf16.json", "ds_configs/zero2_bf16.json"):
        assert ds_config_path(spelling).read_text() == (REPO / "ds_configs" / "zero2_bf16.json").read_text()
    assert set(shipped("ds_configs", ".json")) == {p.stem for p in (REPO / "ds_configs").glob("*.json")}


def test_a_path_elsewhere_is_never_replaced_by_a_shipped_file(tmp_path):
    with pytest.raises(ConfigError, match=r"distributed.ds_config.*other/zero2_bf16.json.*shipped: .*zero3_bf16"):
        ds_config_path("other/zero2_bf16.json")
    with pytest.raises(ConfigError, match=r"--config: nope .*shipped: albef-base, mid, tiny, tiny-minilm"):
        config_path("nope")
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert ds_config_path(str(own)) == own


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The wheel built from this checkout, installed without dependencies into a fresh venv
    outside it; the running venv's packages (torch, deepspeed, ...) are made visible to it
    by a .pth file, so nothing is downloaded or reinstalled."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(REPO)], check=True, cwd=root, timeout=600)
    wheel = next((root / "dist").glob("albef_ds-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "parent_venv.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                           "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return venv, env, root


@pytest.mark.slow
def test_the_wheel_ships_the_presets_and_ds_configs(installed_wheel):
    venv, env, root = installed_wheel
    code = ("import albef_ds, json; from albef_ds.presets import config_path, ds_config_path; "
            "print(json.dumps([albef_ds.__file__, str(config_path('tiny')), str(ds_config_path('zero2_fp32')), "
            "config_path('tiny').read_text(), ds_config_path('zero2_fp32').read_text()]))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=root, env=env, check=True,
                         capture_output=True, text=True).stdout
    module, preset, ds, preset_text, ds_text = json.loads(out)
    for path in (module, preset, ds):
        assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(REPO), path
    assert preset_text == (REPO / "configs" / "tiny.yaml").read_text()
    assert ds_text == (REPO / "ds_configs" / "zero2_fp32.json").read_text()


@pytest.mark.slow
def test_the_wheel_pretrains_from_another_directory_with_a_named_ds_config(installed_wheel, synth_data):
    venv, env, root = installed_wheel
    data, tok = synth_data
    run = root / "run"
    cmd = [str(venv / "bin" / "albef-ds"), "pretrain", "--config", "tiny", "--run-dir", str(run),
           "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}",
           "--set", "distributed.ds_config=zero2_fp32", "--set", "train.max_steps=3",
           "--set", "train.micro_batch_size=8", "--set", "model.vision_depth=1", "--set", "model.text_depth=2",
           "--set", "model.fusion_layer=1", "--set", "logging.progress_bar=false",
           "--set", "logging.tensorboard=false", "--set", "data.num_workers=0"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "DONE").read_text() == "3"
    assert str(REPO) not in proc.stdout.replace(str(data), "").replace(str(tok), "")
