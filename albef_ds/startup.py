"""A program's start-up and exit without the cyclic garbage collector's cost.

Importing torch, torchvision, transformers, timm, DeepSpeed and streaming creates a few
million objects that live as long as the process. While they are being created, Python's
cyclic collector runs its full collections again and again over all of them, and when the
interpreter exits it collects them once more, freeing nothing that the exit would not free
anyway. Measured on 2 CPU cores (docs/benchmarks.md, "Start-up and exit"): a 4-step
1-rank ``albef-ds pretrain`` took 10.5-11.4 s, 6.9 s with the imports made here and the
exit below; the training loop itself is unchanged.

Only the two programs (``albef-ds``, ``albef-data``) call these, each once per process:
:func:`gc.freeze` moves every object alive at that moment out of the collector's reach for
good, which is right for modules but would keep any garbage cycle alive in a long-lived
process that calls a program's ``main`` repeatedly (the tests do).
"""
from __future__ import annotations

import gc
import importlib
from collections.abc import Iterable

#: what training, fine-tuning and evaluation import
TRAINING_IMPORTS = ("torch", "torchvision", "transformers", "timm", "deepspeed", "streaming")


def import_before_work(modules: Iterable[str]) -> None:
    """Import ``modules`` with the cyclic collector off, then freeze what exists (the
    modules' objects) so that later collections skip it. The collector is on afterwards
    (as it was): the work's own cycles are collected as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def before_exit() -> None:
    """Called just before the process exits: the interpreter's last collections then skip
    everything alive now (about 2 s after a training run, measured), which the exit frees
    in any case. atexit handlers, finalizers and stream flushes still run."""
    gc.freeze()
