"""A misconfigured ``albef-ds`` command prints one line naming the key or file and exits 2,
with no traceback. Every case runs through ``albef_ds.cli.main`` in this process
(tests/support/launch.py's in_process puts back the stop handlers it installs)."""
from tests.support.launch import in_process


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
    for name, (argv, needle) in cases.items():
        rc, output = in_process(argv)
        lines = [x for x in output.splitlines() if x.startswith("albef-ds ")]
        assert rc == 2, (name, rc, output[-2000:])
        assert len(lines) == 1 and needle in lines[0], (name, output)
        assert "Traceback" not in output, (name, output)
