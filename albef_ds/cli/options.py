"""Options several subcommands share, worded once."""
from __future__ import annotations

import argparse

#: what --set does, said the same way by every subcommand that has it
OVERRIDE_HELP = "override a config value (repeatable), e.g. --set train.max_steps=100"


def add_overrides(p: argparse.ArgumentParser, help: str = OVERRIDE_HELP) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None,
                   help="where the run's checkpoints, metrics and logs go (= --set logging.run_dir=DIR; "
                        "default: the config's)")
