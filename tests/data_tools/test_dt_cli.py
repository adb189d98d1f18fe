"""The albef-data command line: every subcommand answers --help; bench runs end to end."""
import json

import pytest

from data_tools.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: albef-data " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "convert" in capsys.readouterr().out


def test_bench_runs_and_writes_json(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "s"), "--num-train", "128", "--num-val", "2", "--num-test", "2",
                 "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    assert main(["build-vocab", str(tmp_path / "s" / "captions.txt"), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "200"]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "s" / "train"), "--image-res", "32", "--workers", "0",
                 "--batches", "2", "--batch-size", "8", "--repeats", "1", "--tokenizer", str(tmp_path / "tok"),
                 "--modes", "randaugment", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"]
    assert len(r) == 1 and r[0]["pairs"] == 16 and r[0]["pairs_per_s"] > 0 and r[0]["pairs_per_cpu_s"] > 0
