"""Run ``python -m albef_ds ...`` with a SIGTERM (as scancel or a preemption sends) to the
rank itself during its ``STOP_AT``-th micro-step (the MLM masking of that step), so the
stop is requested at a known step. Launched by tests/train/test_stop_check.py."""
import os
import runpy
import signal
import sys

import albef_ds.losses as losses

calls = {"n": 0}
real = losses.mask_tokens


def mask_tokens_then_stop(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == int(os.environ["STOP_AT"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)


losses.mask_tokens = mask_tokens_then_stop
sys.argv = ["albef_ds"] + sys.argv[1:]
runpy.run_module("albef_ds", run_name="__main__", alter_sys=True)
