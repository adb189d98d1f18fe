"""The reference release's fine-tuned checkpoint layouts (VE, NLVR2, VQA, grounding and
NLVR2's text-assignment stage): our task models export exactly their keys and shapes (the
lists in tests/fixtures were read from the reference code itself), and a checkpoint in
that layout loads strictly into the task model and exports back unchanged."""

import pytest
import torch

from albef_ds.config import load_config
from albef_ds.models import ALBEF
from albef_ds.objectives import reference_layout
from albef_ds.train.trainer import build_model, make_objective
from albef_ds.weights import WeightLoadError, export_albef_state_dict

from tests.support.layouts import TASKS, fixture_layout, randomise, small_cfg

@pytest.mark.parametrize("task", TASKS)
def test_export_has_exactly_the_reference_keys_and_shapes(task):
    cfg = load_config("albef-base", ["model.image_res=384", f"train.objective={task}"])
    objective = make_objective(cfg, None)
    with torch.device("meta"):  # albef-base sizes, no memory
        model = ALBEF(cfg.model)
        objective.extend_model(model)
    ours = {k: tuple(v.shape) for k, v in export_albef_state_dict(model, **reference_layout(cfg)).items()}
    want = fixture_layout(task)
    assert sorted(set(want) - set(ours)) == [] and sorted(set(ours) - set(want)) == []
    assert {k: ours[k] for k in want if ours[k] != want[k]} == {}


@pytest.mark.parametrize("task", TASKS)
def test_reference_layout_loads_strictly_and_exports_back(task, tmp_path):
    cfg = small_cfg(task)
    source = build_model(cfg, log=lambda *a: None, objective=make_objective(cfg, None))
    randomise(source, 1)
    exported = export_albef_state_dict(source, **reference_layout(cfg))
    path = tmp_path / "reference.pth"
    torch.save({"model": exported}, path)

    cfg2 = small_cfg(task, init=path)
    loaded = build_model(cfg2, log=lambda *a: None, objective=make_objective(cfg2, None))
    again = export_albef_state_dict(loaded, **reference_layout(cfg2))
    assert set(again) == set(exported)
    for k, v in exported.items():
        assert torch.equal(again[k], v), k

    # Strict: a tensor the task needs missing, or one it does not know, is an error naming it.
    needed = next(k for k in exported if k.startswith("visual_encoder.blocks"))
    torch.save({"model": {k: v for k, v in exported.items() if k != needed}}, path)
    with pytest.raises(WeightLoadError, match="blocks"):
        build_model(small_cfg(task, init=path), log=lambda *a: None, objective=make_objective(cfg2, None))
    torch.save({"model": {**exported, "cls_head.9.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(WeightLoadError, match="cls_head.9.weight"):
        build_model(small_cfg(task, init=path), log=lambda *a: None, objective=make_objective(cfg2, None))
