"""Task checkpoints load strictly: one that holds a task's heads but lacks any tensor of the
task is refused, naming it. Only what the reference's own checkpoints of that task never hold
may start fresh: the objective's ``unused_parts``, checked here against the reference key
lists in tests/fixtures (read from the reference code). ``checkpoint.allow_partial=true``
loads such a checkpoint deliberately and the log names every tensor that started fresh."""
import re

import pytest
import torch

from albef_ds.config import load_config
from albef_ds.models import ALBEF
from albef_ds.objectives import reference_layout
from albef_ds.train.trainer import build_model, make_objective
from albef_ds.weights import WeightLoadError, export_albef_state_dict
from tests.support.layouts import fixture_layout, randomise, small_cfg

#: (task, a tensor its checkpoint holds, in the reference layout): one per head and per part
#: that the old loading let start fresh
DROPPED = [
    ("ve", "cls_head.2.bias"), ("ve", "cls_head_m.0.weight"),
    ("nlvr2", "cls_head.0.weight"), ("nlvr2", "cls_head_m.2.bias"),
    ("nlvr_ta", "ta_head.bias"), ("nlvr_ta", "vision_proj.weight"), ("nlvr_ta", "temp"),
    ("vqa", "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"),
    ("vqa", "text_decoder_m.bert.encoder.layer.0.output.dense.bias"),
    ("vqa", "text_decoder.cls.predictions.transform.dense.weight"),
    ("grounding", "itm_head.weight"), ("grounding", "text_encoder_m.encoder.layer.3.crossattention.self.value.bias"),
    ("retrieval", "itm_head.weight"),
]


def task_checkpoint(task, tmp_path, drop=(), seed=1):
    """A trained-looking model of ``task`` in the reference's layout of its checkpoints,
    ``drop``ped keys removed; (path, the saved state)."""
    cfg = small_cfg(task)
    source = build_model(cfg, log=lambda *a: None, objective=make_objective(cfg, None))
    randomise(source, seed)
    state = export_albef_state_dict(source, **reference_layout(cfg))
    for key in drop:
        assert key in state, key
        del state[key]
    path = tmp_path / f"{task}.pth"
    torch.save({"model": state}, path)
    return path, state


def load(task, path, allow_partial=False, log=lambda *a: None):
    cfg = small_cfg(task, init=path)
    cfg.checkpoint.allow_partial = allow_partial
    objective = make_objective(cfg, None)  # its config needs applied before the model is built
    return build_model(cfg, log=log, objective=objective)


@pytest.mark.parametrize("task,key", DROPPED)
def test_a_task_checkpoint_lacking_one_of_its_tensors_is_refused_naming_it(task, key, tmp_path):
    path, _ = task_checkpoint(task, tmp_path, drop=[key])
    with pytest.raises(WeightLoadError) as err:
        load(task, path)
    message = str(err.value)
    # named by the model's key (the reference's text_encoder.encoder.* is our text_encoder.bert.encoder.*)
    ours = re.sub(r"^(text_encoder(?:_m)?)\.(encoder|embeddings)\.", r"\1.bert.\2.", key)
    assert f"missing 1 key(s): {ours}" in message and "checkpoint.allow_partial=true" in message


def test_allow_partial_loads_the_rest_and_names_every_fresh_tensor(tmp_path):
    layer = "text_decoder.bert.encoder.layer.1."
    cfg = small_cfg("vqa")
    full = export_albef_state_dict(build_model(cfg, log=lambda *a: None, objective=make_objective(cfg, None)),
                                   **reference_layout(cfg))
    dropped = [k for k in full if k.startswith(layer)]
    assert len(dropped) > 10
    path, state = task_checkpoint("vqa", tmp_path, drop=dropped)
    with pytest.raises(WeightLoadError, match=re.escape(layer)):
        load("vqa", path)
    lines = []
    model = load("vqa", path, allow_partial=True, log=lambda m: lines.append(str(m)))
    (fresh,) = [line for line in lines if line.startswith("checkpoint.allow_partial:")]
    assert fresh.startswith(f"checkpoint.allow_partial: {len(dropped)} tensor(s) missing from the checkpoint "
                            f"started fresh: ")
    assert sorted(fresh.split("started fresh: ")[1].split(", ")) == sorted(dropped)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k.startswith("text_decoder"))
    # still strict about tensors the model does not have
    torch.save({"model": {**state, "text_decoder.extra.weight": torch.zeros(2)}}, path)
    with pytest.raises(WeightLoadError, match="unexpected 1 key.*text_decoder.extra.weight"):
        load("vqa", path, allow_partial=True)


def test_nlvr2_from_its_text_assignment_stage_starts_the_classifier_fresh(tmp_path):
    path, state = task_checkpoint("nlvr_ta", tmp_path)
    model = load("nlvr2", path)  # no classifier in it: not refused, the classifier is the build's
    loaded = model.state_dict()
    assert torch.equal(loaded["text_encoder.bert.encoder.layer.5.crossattention.self.key.weight"],
                       state["text_encoder.encoder.layer.5.crossattention.self.key.weight"])  # 2nd image's block


REFERENCE_TASKS = ("ve", "nlvr2", "vqa", "nlvr_ta")


@pytest.mark.parametrize("task", REFERENCE_TASKS)
def test_what_may_start_fresh_is_exactly_what_the_reference_never_saves(task):
    """albef-base on the meta device: the model's tensors not in the reference checkpoint's
    key list are all under the objective's unused_parts, and none it holds is."""
    cfg = load_config("albef-base", ["model.image_res=384", f"train.objective={task}"])
    objective = make_objective(cfg, None)
    with torch.device("meta"):
        model = ALBEF(cfg.model)
        objective.extend_model(model)
    bert_model = type(objective).reference_text_is_bert_model
    saved = {re.sub(r"^(text_encoder(?:_m)?)\.(encoder|embeddings)\.", r"\1.bert.\2.", k) if bert_model else k
             for k in fixture_layout(task)}
    ours = set(model.state_dict())
    assert saved <= ours

    def optional(key):
        return any(key == p or key.startswith(p + ".") for p in objective.unused_parts)
    assert sorted(k for k in ours - saved if not optional(k)) == []
    assert sorted(k for k in saved if optional(k)) == []
