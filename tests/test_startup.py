"""albef_ds/startup.py: heavy imports with the collector off, frozen; the collector still works."""
import subprocess
import sys

CHILD = r"""
import gc, sys
from albef_ds import startup
assert "torch" not in sys.modules
startup.import_before_work(["torch", "timm"])
assert "torch" in sys.modules and "timm" in sys.modules
assert gc.isenabled()
frozen = gc.get_freeze_count()
assert frozen > 100_000, frozen  # torch's and timm's objects, out of the collector's reach

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a
del a, b
assert gc.collect() >= 2  # a cycle made afterwards is still collected
gc.disable()
startup.import_before_work(["json"])
assert not gc.isenabled()  # left as it was
print("ok", frozen)
"""


def test_imports_are_made_frozen_and_later_cycles_still_collected():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ")


def test_both_programs_enter_through_the_startup_path():
    """The console scripts and ``python -m albef_ds`` call ``program`` (main with the
    start-up imports and the frozen exit), not ``main``."""
    from importlib.metadata import entry_points
    from pathlib import Path

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["albef-ds"] == "albef_ds.cli:program"
    assert scripts["albef-data"] == "data_tools.cli:program"
    import albef_ds
    assert "program()" in (Path(albef_ds.__file__).parent / "__main__.py").read_text()
