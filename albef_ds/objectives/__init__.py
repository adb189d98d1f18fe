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
}


def objective_class(name: str) -> type[Objective]:
    from ..config import ConfigError
    if name not in OBJECTIVES:
        raise ConfigError(f"config key 'train.objective': unknown objective {name!r} "
                          f"(known: {', '.join(sorted(OBJECTIVES))})")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["OBJECTIVES", "Objective", "StepContext", "objective_class"]
