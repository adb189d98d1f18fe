"""Run ``python -m albef_ds ...`` with an error injected into the training loop on rank
``INJECT_RANK`` (default 0), after printing the time: ``INJECT_IN=main`` (default): the
``INJECT_AT``-th call of the MLM masking raises in the rank's process; ``INJECT_IN=worker``:
the ``INJECT_AT``-th sample a data-loader worker reads raises in that worker (the error
reaches the rank through the DataLoader, as an unreadable shard's does); ``INJECT_IN=resume``:
``Trainer.resume`` raises before loading anything. Launched by
tests/train/test_failure_paths.py."""
import os
import runpy
import sys
import time

import albef_ds.losses as losses

calls = {"n": 0}
real = losses.mask_tokens


def failing_mask_tokens(*args, **kwargs):
    calls["n"] += 1
    if os.environ.get("RANK", "0") == os.environ.get("INJECT_RANK", "0") and calls["n"] == int(os.environ["INJECT_AT"]):
        print(f"INJECTED {time.time():.3f}", file=sys.stderr, flush=True)
        raise RuntimeError("injected failure in the training loop")
    return real(*args, **kwargs)


def failing_getitem(self, index):
    calls["n"] += 1
    if os.environ.get("RANK", "0") == os.environ.get("INJECT_RANK", "0") and calls["n"] == int(os.environ["INJECT_AT"]):
        print(f"INJECTED {time.time():.3f}", file=sys.stderr, flush=True)
        raise RuntimeError("injected failure in the training loop")
    return real_getitem(self, index)


def failing_resume(self, *args, **kwargs):
    if os.environ.get("RANK", "0") == os.environ.get("INJECT_RANK", "0"):
        print(f"INJECTED {time.time():.3f}", file=sys.stderr, flush=True)
        raise RuntimeError("injected failure at resume")
    return real_resume(self, *args, **kwargs)


if os.environ.get("INJECT_IN") == "resume":
    from albef_ds.train.trainer import Trainer
    real_resume = Trainer.resume
    Trainer.resume = failing_resume
elif os.environ.get("INJECT_IN", "main") == "worker":
    from albef_ds.data.dataset import PairDataset
    real_getitem = PairDataset.__getitem__
    PairDataset.__getitem__ = failing_getitem
else:
    losses.mask_tokens = failing_mask_tokens
sys.argv = ["albef_ds"] + sys.argv[1:]
runpy.run_module("albef_ds", run_name="__main__", alter_sys=True)
