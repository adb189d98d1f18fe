"""The reference release's task checkpoint layouts (key lists read from the reference code,
tests/fixtures) and small task models to load them into (tests/objectives)."""
from pathlib import Path

import torch

from albef_ds.config import load_config

FIXTURES = Path(__file__).parent.parent / "fixtures"
TASKS = ("ve", "nlvr2", "vqa", "grounding", "nlvr_ta")


def fixture_layout(task: str) -> dict:
    rows = {}
    for line in (FIXTURES / f"albef_{task}_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split()
            rows[name] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return rows


def small_cfg(task: str, tmp_path=None, init=None):
    overrides = ["model.image_res=32", "model.patch_size=16", "model.vision_width=32", "model.vision_depth=1",
                 "model.vision_heads=2", "model.text_width=32", "model.text_depth=4", "model.fusion_layer=2",
                 "model.text_heads=2", "model.text_intermediate=64", "model.vocab_size=60", "model.embed_dim=16",
                 "model.queue_size=64", "train.micro_batch_size=4", f"train.objective={task}"]
    if init:
        overrides.append(f"checkpoint.init_from={init}")
    return load_config("tiny", overrides)


@torch.no_grad()
def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
