"""``albef-ds``: training, evaluation and tools, one subcommand each.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, importing lazily so that
``albef-ds --help`` answers without loading torch. This package is the only place that
parses arguments, prints for the user and picks exit statuses: the library raises
:class:`albef_ds.errors.UsageError` (config, checkpoint, weights) or FileNotFoundError, and
:func:`main` prints that as one line and exits 2; an evaluation that a stop signal ended
raises :class:`albef_ds.errors.Interrupted`: one line, exit 128 + the signal's number.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import startup
from ..errors import Interrupted, UsageError

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "pretrain": ("albef_ds.cli.pretrain", "pretrain ALBEF (deepspeed, torchrun, srun or plain python)"),
    "finetune": ("albef_ds.cli.finetune", "fine-tune a pretrained model on a downstream task (--task)"),
    "finetune-retrieval": ("albef_ds.cli.finetune", "fine-tune a checkpoint for retrieval (= finetune --task retrieval)"),
    "eval-retrieval": ("albef_ds.cli.eval_retrieval", "zero-shot / fine-tuned image-text retrieval"),
    "eval": ("albef_ds.cli.eval_task", "a fine-tuned model on a VQA / NLVR2 / SNLI-VE / grounding split"),
    "export": ("albef_ds.cli.export", "consolidate a checkpoint into our layout and ALBEF .pth"),
    "model-info": ("albef_ds.cli.model_info", "parameter counts and analytic FLOPs per part"),
    "bench": ("albef_ds.cli.bench", "time the Trainer's training step, phases, pairs/s and MFU"),
    "gpu-check": ("albef_ds.cli.gpu_check", "a lent GPU's environment, step speed, MFU, kill/resume, fp16 (--dry-run on CPU)"),
    "demo": ("albef_ds.cli.demo", "synth data -> tiny pretraining -> zero-shot retrieval, one command"),
}


#: what a subcommand imports before its work, when it runs as a program (:func:`program`);
#: the others import :data:`albef_ds.startup.TRAINING_IMPORTS`
IMPORTS = {
    "model-info": ("torch", "torchvision", "timm"),
    "export": ("torch", "torchvision", "timm", "deepspeed"),
    "eval-retrieval": ("torch", "torchvision", "transformers", "timm", "deepspeed"),
    "eval": ("torch", "torchvision", "transformers", "timm", "deepspeed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albef-ds",
        description="ALBEF vision-language pretraining on DeepSpeed. "
                    "Run 'albef-ds SUBCOMMAND --help' for each subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Each module adds its own options only when asked for, keeping --help fast.
        if name in sys.argv[1:2]:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run one subcommand; its exit status. ``own_process``: this process exists for it
    (:func:`program`), so its heavy imports are made with the collector off and frozen."""
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher puts --local_rank=N before our subcommand; LOCAL_RANK (set by
    # every launcher, read in albef_ds.distributed) carries the same information.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    sys.argv[1:] = argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    if own_process:
        startup.import_before_work((*IMPORTS.get(args.command, startup.TRAINING_IMPORTS), args._module))
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, FileNotFoundError) as e:
        print(f"albef-ds {args.command}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:  # a stop signal during an evaluation: no traceback, the signal's status
        print(f"albef-ds {args.command}: {one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_status


def one_line(error: BaseException) -> str:
    text = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else \
        f"{error.strerror or 'not found'}: {error.filename}"
    return " ".join(text.split())


def program() -> None:
    """``albef-ds`` and ``python -m albef_ds``: :func:`main` in a process of its own (start-up
    and exit without the cyclic collector's cost: albef_ds/startup.py)."""
    code = main(own_process=True)
    startup.before_exit()
    sys.exit(code)


if __name__ == "__main__":
    program()
