"""``albef-ds eval-retrieval``: zero-shot or fine-tuned retrieval on an ALBEF-style split.

    albef-ds eval-retrieval --model runs/tiny --split data/synth/test.json --image-root data/synth
    torchrun --nproc_per_node 2 -m albef_ds.cli eval-retrieval ...   (same numbers, split over ranks)

``--model`` takes an export directory (model.pt + config.yaml), a run directory or a
checkpoint directory (consolidated on the fly), or a reference ALBEF ``.pth`` with
``--config``; ``--untrained`` evaluates a freshly initialised model (the baseline). Texts
are tokenised in the form the model was trained on (``data.text_form``): a config that says
otherwise is refused, naming both forms.

The compositional test (``albef-data synth``'s compositional.json: each image's true
caption among binding-swapped distractors of the same words) runs too, on rank 0, when
``--compositional FILE`` names it or a compositional.json sits beside ``--split``; its
image paths are relative to its own directory. ``--compositional none`` skips it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides
    p.add_argument("--model", default=None, help="export dir, run dir, checkpoint dir, or ALBEF .pth (with --config)")
    p.add_argument("--config", default=None, help="config for a .pth or --untrained model, or overrides' base")
    add_overrides(p, "override a value of the model's saved config (repeatable), e.g. --set eval.k_test=64")
    p.add_argument("--untrained", action="store_true", help="evaluate a randomly initialised model")
    p.add_argument("--split", required=True, help="retrieval JSON: [{image, caption: [...]}, ...]")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to "
                                                       "(default: the split file's directory)")
    p.add_argument("--k", type=int, default=None, help="ITM re-ranking depth (default: eval.k_test)")
    p.add_argument("--max-images", type=int, default=None,
                   help="evaluate on the first N images only (of the compositional test too)")
    p.add_argument("--out", default=None, help="directory for retrieval.json and TensorBoard scalars")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: data.tokenizer)")
    p.add_argument("--compositional", default=None, metavar="FILE",
                   help="compositional test JSON (default: compositional.json beside --split if there; "
                        "'none' skips it)")


def load_model(args):
    """(model, cfg) for the --model / --config / --untrained combination."""
    from ..config import load_config
    from ..models import ALBEF
    if args.untrained:
        cfg = load_config(args.config, args.overrides)
        torch.manual_seed(cfg.train.seed)
        return ALBEF(cfg.model), cfg
    path = Path(args.model)
    if (path / "model.pt").is_file():
        from ..train.export import load_exported
        return load_exported(path)
    if path.suffix in (".pth", ".pt") and path.is_file():
        if not args.config:
            raise UsageError(f"--model {path}: a weights file needs --config to build the model")
        cfg = load_config(args.config, args.overrides)
        from ..train.export import check_text_form, recorded_text_form
        from ..weights import TEXT_FORM_KEY, load_albef_checkpoint, read_checkpoint
        state, source, record = read_checkpoint(path)
        check_text_form(*recorded_text_form(path, record.get(TEXT_FORM_KEY)), cfg)
        model = ALBEF(cfg.model)
        print(load_albef_checkpoint(model, state, strict=False, source=source))
        return model, cfg
    from ..train.export import check_text_form, checkpoint_text_form, consolidate, load_saved_config, resolve_checkpoint
    tag_dir = resolve_checkpoint(str(path), "--model")
    cfg = (load_config(args.config, args.overrides) if args.config
           else load_saved_config(tag_dir.parent.parent / "config.yaml", args.overrides))
    check_text_form(checkpoint_text_form(tag_dir), str(tag_dir), cfg)
    return consolidate(tag_dir, cfg), cfg


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..eval.io import make_io, read_split
    from ..eval.retrieval import chance_row, evaluate, format_table, ranking_rows
    from ..tokenizer import load_tokenizer
    from ..train.stop import EVALUATION_INTERRUPT_NOTE, StopFlag

    if args.model is None and not args.untrained:
        raise UsageError("give --model PATH or --untrained --config FILE")
    stop = StopFlag(interrupt_note=EVALUATION_INTERRUPT_NOTE)  # read between batches
    launch = dist_lib.read_launch_env()
    if launch.world_size > 1:
        dist_lib.init_distributed("gloo" if not torch.cuda.is_available() else "auto")
    model, cfg = load_model(args)
    device = dist_lib.device() if launch.world_size > 1 else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model.to(device)
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer)
    split_path = Path(args.split)
    if not split_path.is_file():
        raise UsageError(f"--split {split_path}: file not found")
    comp_path = compositional_path(args.compositional, split_path)  # a bad path fails before the work
    split = read_split(split_path, cfg.data.max_words, args.max_images or cfg.eval.max_images)
    image_root = Path(args.image_root) if args.image_root else split_path.parent
    load_images, tokenize = make_io(cfg, split, image_root, tokenizer)

    k = args.k or cfg.eval.k_test
    if launch.rank == 0:
        print(f"evaluating retrieval: {len(split.images)} images, {len(split.texts)} texts; ITM re-ranks the "
              f"top {k} by ITC", flush=True)
    metrics = evaluate(model, split, load_images, tokenize, k, cfg.eval.batch_size, launch.rank, launch.world_size,
                       dist_lib.all_reduce_sum, device, progress=sys.stderr.isatty(),  # a file gets no '\r' bars
                       stop=stop)
    if launch.rank == 0:
        print(format_table({**ranking_rows(metrics), "chance": chance_row(metrics)}))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "retrieval.json").write_text(json.dumps(metrics, indent=2))
            from torch.utils.tensorboard import SummaryWriter
            with SummaryWriter(str(out / "tensorboard")) as w:
                for k, v in metrics.items():
                    w.add_scalar(f"retrieval/{k}", v, 0)
            print(f"wrote {out / 'retrieval.json'}")
        if comp_path is not None:
            run_compositional(model, cfg, comp_path, tokenizer, device, args, stop)
    return 0


def compositional_path(value, split_path: Path):
    """The compositional test to run: the one named, else the one beside the split, else None."""
    from ..eval.compositional import FILE
    if value is None:
        beside = split_path.parent / FILE
        return beside if beside.is_file() else None
    if value.lower() == "none":
        return None
    if not Path(value).is_file():
        raise UsageError(f"--compositional {value}: file not found")
    return Path(value)


def run_compositional(model, cfg, path: Path, tokenizer, device, args, stop=None) -> dict:
    """Print (and with --out write compositional.json and its scalars) the accuracy of
    picking the true caption by ITC and by ITM, beside chance."""
    from ..eval.compositional import evaluate_compositional, format_compositional
    from ..eval.io import make_io, read_compositional
    data = read_compositional(path, cfg.data.max_words, args.max_images or cfg.eval.max_images)
    load_images, tokenize = make_io(cfg, data, path.parent, tokenizer)
    m = evaluate_compositional(model, data, load_images, tokenize, device, cfg.eval.batch_size, stop)
    print(f"\n{format_compositional(m)}\n({path})")
    if args.out:
        out = Path(args.out)
        (out / "compositional.json").write_text(json.dumps(m, indent=2))
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(str(out / "tensorboard")) as w:
            for k, v in m.items():
                w.add_scalar(f"compositional/{k}", v, 0)
        print(f"wrote {out / 'compositional.json'}")
    return m
