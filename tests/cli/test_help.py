"""``albef-ds SUBCOMMAND --help``: every option says what it does; no default is stated
twice or as a meaningless None/True/False; reST markup never reaches the terminal."""
import argparse
import importlib

import pytest

from albef_ds.cli import SUBCOMMANDS, main


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"albef-ds {command}")
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(p)
    return p


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_option_says_what_it_does(command, capsys):
    p = _parser(command)
    silent = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not silent, silent
    formatter = p._get_formatter()
    doubled = [a.option_strings for a in p._actions if a.help and formatter._expand_help(a).count("default") > 1]
    assert not doubled, doubled
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: albef-ds {command}"), text[:200]
    for noise in ("(default: None)", "(default: True)", "(default: False)", "``"):
        assert noise not in text, (noise, text)
