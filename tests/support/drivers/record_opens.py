"""Run ``python -m albef_ds ...`` recording every file this process opens under a
``checkpoints/`` folder into ``$ALBEF_OPEN_LOG.rank<RANK>`` (an audit hook: it sees the
opens of torch.load, DeepSpeed and our own code alike). Launched by tests/train/test_scale_out.py."""
import os
import runpy
import sys

log = open(f"{os.environ['ALBEF_OPEN_LOG']}.rank{os.environ.get('RANK', '0')}", "w", encoding="utf-8")


def record(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if "/checkpoints/" in path:
            log.write(path + "\n")
            log.flush()


sys.addaudithook(record)
sys.argv = ["albef_ds"] + sys.argv[1:]
runpy.run_module("albef_ds", run_name="__main__", alter_sys=True)
