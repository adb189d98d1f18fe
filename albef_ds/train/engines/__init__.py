"""Training engines: one file per library (DeepSpeed, FSDP2), all behind the protocol in
:mod:`.base`, chosen by the config key ``distributed.engine``."""
from .base import ENGINES, Engine, WholeTensorViews, engine_class

__all__ = ["ENGINES", "Engine", "WholeTensorViews", "engine_class"]
