"""A misconfigured ``albef-ds`` command prints one line naming the key or file and exits 2,
with no traceback. One interpreter runs every case (each through ``albef_ds.cli.main``),
in a subprocess so the stop handlers it installs stay out of pytest."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVER = r"""
import contextlib, io, json, sys
from albef_ds.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_misconfigured_commands_print_one_line_and_exit_2(synth_data, tmp_path):
    data, tok = synth_data
    base = ["pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "r"),
            "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = {
        # argv: what the one line must name
        "unknown key": (base + ["--set", "model.queue_sise=8"], "model.queue_sise"),
        "unknown preset": (["pretrain", "--config", "nope"], "nope"),
        "bad type": (base + ["--set", "train.max_steps=many"], "train.max_steps"),
        "missing data": (["pretrain", "--config", "tiny", "--set", "data.train_dirs=[/no/such/dir]",
                          "--set", f"data.tokenizer={tok}"], "/no/such/dir"),
        "missing ds_config": (base + ["--set", "distributed.ds_config=zero9_magic"], "distributed.ds_config"),
        "invalid ds_config": (base + ["--set", f"distributed.ds_config={bad_json}"], str(bad_json)),
        "unknown objective": (base + ["--set", "train.objective=vqa2"], "train.objective"),
        "eval without model": (["eval-retrieval", "--split", str(data / "test.json")], "--model"),
        "export of a non-checkpoint": (["export", str(tmp_path / "nothing")], str(tmp_path / "nothing")),
        "finetune without val split": (["finetune", "--config", "tiny", "--init", str(tmp_path),
                                        "--set", f"data.train_dirs=[{data / 'train'}]",
                                        "--set", f"data.tokenizer={tok}"], "data.val_dir"),
    }
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([argv for argv, _ in cases.values()])],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (name, (_, needle)), r in zip(cases.items(), results):
        lines = [x for x in r["stderr"].splitlines() if x.startswith("albef-ds ")]
        assert r["rc"] == 2, (name, r)
        assert len(lines) == 1 and needle in lines[0], (name, r["stderr"])
        assert "Traceback" not in r["stderr"], (name, r["stderr"])
