"""``albef-ds demo``: watch ALBEF learn, in one command, on a fresh machine.

1. ``albef-data synth``: procedural shapes/colours/relations with paraphrased captions
   (train pairs as MDS shards; a fixed test split of 1,000 images x 5 captions).
2. ``albef-data build-vocab``: a WordPiece vocabulary from the train captions.
3. ``albef-ds pretrain``: the tiny model (configs/tiny.yaml, no queue: DEMO_OVERRIDES) on
   one process, through the real DeepSpeed engine; checkpoints, metrics.jsonl and
   TensorBoard in the run directory.
4. ``albef-ds eval-retrieval``: zero-shot retrieval on the test split, for the untrained
   model and the trained one, beside chance.

Every number is reproducible from ``--seed``. On a GPU the same steps run faster; the
model stays tiny unless ``--config`` names another.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

#: defaults sized for ~8 minutes on a 2-core CPU, under the issue's 10 (docs/benchmarks.md).
DEFAULT_TRAIN_PAIRS = 20_000
DEFAULT_STEPS = 1000
DEFAULT_TEST_IMAGES = 1000
#: The demo trains without the momentum-feature queue. From random init the queue holds
#: features of an encoder hundreds of steps stale; on this schedule it costs over half the
#: recall (docs/benchmarks.md, "Ablations": 3 seeds). ``--set model.queue_size=1024`` puts
#: it back (the tiny preset's value).
DEMO_OVERRIDES = ["model.queue_size=0"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="working directory (data, tokenizer, run)")
    p.add_argument("--config", default="tiny", help="model/training config (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    p.add_argument("--train-pairs", type=int, default=DEFAULT_TRAIN_PAIRS)
    p.add_argument("--test-images", type=int, default=DEFAULT_TEST_IMAGES)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of pretraining")
    p.add_argument("--k", type=int, default=None, help="ITM re-ranking depth (default: eval.k_test)")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def prepare_data(out: Path, seed: int, train_pairs: int, test_images: int) -> tuple[Path, Path]:
    from data_tools.synth import SynthOptions, synth

    from ..tokenizer import build_vocab
    data, tok = out / "data", out / "tokenizer"
    marker = data / "synth.json"
    wanted = {"seed": seed, "num_train": train_pairs, "num_test": test_images}
    if not (marker.is_file() and all(json.loads(marker.read_text()).get(k) == v for k, v in wanted.items())):
        _say(f"1/4 synth data: {train_pairs} train pairs, {test_images} test images x 5 captions")
        synth(SynthOptions(out=str(data), seed=seed, num_train=train_pairs, num_val=200,
                           num_test=test_images, workers=os.cpu_count() or 1))
    else:
        _say(f"1/4 synth data: reusing {data}")
    if not (tok / "tokenizer.json").is_file():
        _say("2/4 vocabulary")
        build_vocab([str(data / "captions.txt")], tok, vocab_size=1024)
    else:
        _say(f"2/4 vocabulary: reusing {tok}")
    return data, tok


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..config import load_config
    from ..eval.retrieval import evaluate, format_table
    from ..eval.io import make_io, read_split
    from ..models import ALBEF
    from ..tokenizer import load_tokenizer
    from ..train.export import consolidate
    from ..train.trainer import train

    start = time.time()
    out = Path(args.out)
    if args.fresh and (out / "run").exists():
        import shutil
        shutil.rmtree(out / "run")
    data, tok = prepare_data(out, args.seed, args.train_pairs, args.test_images)

    run_dir = out / "run"
    overrides = [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}",
                 f"logging.run_dir={run_dir}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                 f"data.shuffle_seed={args.seed}", f"checkpoint.every_steps={max(1, args.steps // 4)}",
                 *DEMO_OVERRIDES, *args.overrides]
    cfg = load_config(args.config, overrides)
    _say(f"3/4 pretraining {args.config} for {args.steps} steps "
         f"(TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    status = train(cfg, launch, "auto")
    if status != 0:
        return status
    train_s = time.time() - start

    _say(f"4/4 zero-shot retrieval on {args.test_images} test images x 5 captions")
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(tok)
    split = read_split(data / "test.json", cfg.data.max_words)
    load_images, tokenize = make_io(cfg, split, data, tokenizer)
    device = dist_lib.device()
    k = args.k or cfg.eval.k_test

    def measure(model):
        return evaluate(model.to(device), split, load_images, tokenize, k, cfg.eval.batch_size,
                        device=device, progress=True)
    torch.manual_seed(cfg.train.seed)
    untrained = measure(ALBEF(cfg.model))
    ckpt_dir = run_dir / "checkpoints"
    tag = (ckpt_dir / "latest").read_text().strip()
    trained = measure(consolidate(ckpt_dir / tag, cfg))
    (run_dir / "retrieval.json").write_text(json.dumps({"untrained": untrained, "trained": trained}, indent=2))
    itc = {k2[4:]: v for k2, v in trained.items() if k2.startswith("itc_")}
    print()
    print(format_table({"untrained (ITM re-rank)": untrained, "trained, ITC only": itc,
                        f"trained, ITM re-rank k={k}": trained,
                        "chance": {"txt_r1": trained["chance_txt_r1"], "img_r1": trained["chance_img_r1"]}}))
    print(f"\nTR@1 {trained['txt_r1']:.2f}% = {trained['txt_r1'] / trained['chance_txt_r1']:.0f}x chance, "
          f"IR@1 {trained['img_r1']:.2f}% = {trained['img_r1'] / trained['chance_img_r1']:.0f}x chance "
          f"(chance: TR@1 {trained['chance_txt_r1']:.2f}%, IR@1 {trained['chance_img_r1']:.2f}%)")
    print(f"done in {time.time() - start:.0f} s (training {train_s:.0f} s).\n"
          f"  checkpoints:  {ckpt_dir}\n  metrics:      {run_dir / 'metrics.jsonl'}\n"
          f"  retrieval:    {run_dir / 'retrieval.json'}\n"
          f"  TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0
