"""Training objectives, registered by name (``train.objective``).

Each objective is one module holding its whole logic (inputs, losses, diagnostics, log
keys); the losses themselves are pure functions in :mod:`albef_ds.losses`. A new
objective is a new module and one line in :data:`OBJECTIVES`.
"""
from __future__ import annotations

import importlib

from .base import Objective, StepContext

#: name -> "module:class", imported on first use
OBJECTIVES = {
    "pretrain": "albef_ds.objectives.pretrain:PretrainObjective",
    "retrieval": "albef_ds.objectives.retrieval:RetrievalObjective",
    "itc": "albef_ds.objectives.itc_only:ITCOnlyObjective",
    "ve": "albef_ds.objectives.ve:VEObjective",
    "nlvr2": "albef_ds.objectives.nlvr2:NLVR2Objective",
    "vqa": "albef_ds.objectives.vqa:VQAObjective",
    "grounding": "albef_ds.objectives.grounding:GroundingObjective",
    "nlvr_ta": "albef_ds.objectives.nlvr_ta:TextAssignmentObjective",
}


def objective_class(name: str) -> type[Objective]:
    from ..config import ConfigError
    if name not in OBJECTIVES:
        raise ConfigError(f"config key 'train.objective': unknown objective {name!r} "
                          f"(known: {', '.join(sorted(OBJECTIVES))})")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task_model(cfg):
    """ALBEF with the heads of ``cfg.train.objective`` (fresh weights): the model a
    checkpoint or export of that objective's run loads into."""
    from ..models import ALBEF
    model = ALBEF(cfg.model)
    objective_class(cfg.train.objective)(cfg, None).extend_model(model)
    return model


def reference_layout(cfg) -> dict:
    """``save_albef_pth`` keyword arguments giving the reference layout of the objective's task."""
    cls = objective_class(cfg.train.objective)
    if cls.reference_layout == "retrieval":  # the fine-tuned retrieval model's (grounding's too)
        return {"layout": "retrieval"}
    if not cls.reference_layout:
        return {"layout": "pretrain"}
    return {"layout": "task", "keep": cls.reference_layout, "text_is_bert_model": cls.reference_text_is_bert_model}


__all__ = ["OBJECTIVES", "Objective", "StepContext", "objective_class", "build_task_model", "reference_layout"]
