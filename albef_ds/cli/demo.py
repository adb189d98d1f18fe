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


def results_table(untrained: dict, trained: dict, k: int) -> str:
    """Both ways of ranking for the trained model (ITC alone, then ITM re-ranking of its
    top k: either may be the better one), the untrained model's and chance, R@1/5/10."""
    from ..eval.retrieval import chance_row, format_table

    def itc(m: dict) -> dict:
        return {key[4:]: v for key, v in m.items() if key.startswith("itc_")}
    return format_table({"untrained, ITC only": itc(untrained), f"untrained, ITM re-rank k={k}": untrained,
                         "trained, ITC only": itc(trained), f"trained, ITM re-rank k={k}": trained,
                         "chance": chance_row(trained)})


def headline(trained: dict) -> str:
    """R@1 both ways for each ranking, as multiples of chance, naming which ranking each
    figure is and which of the two is the better here."""
    def figures(prefix: str) -> str:
        tr, ir = trained[f"{prefix}txt_r1"], trained[f"{prefix}img_r1"]
        return (f"TR@1 {tr:.2f}% = {tr / trained['chance_txt_r1']:.0f}x chance, "
                f"IR@1 {ir:.2f}% = {ir / trained['chance_img_r1']:.0f}x chance")
    itc_sum = trained["itc_txt_r1"] + trained["itc_img_r1"]
    itm_sum = trained["txt_r1"] + trained["img_r1"]
    better = "ITC only" if itc_sum > itm_sum else "ITM re-ranked" if itm_sum > itc_sum else "neither"
    return (f"trained, ITC only:      {figures('itc_')}\n"
            f"trained, ITM re-ranked: {figures('')} (top {trained.get('k_test', '?')} by ITC re-ranked)\n"
            f"better R@1 here: {better} (chance: TR@1 {trained['chance_txt_r1']:.2f}%, "
            f"IR@1 {trained['chance_img_r1']:.2f}%)")


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..config import load_config
    from ..eval.retrieval import evaluate
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
    print()
    print(results_table(untrained, trained, k))
    print()
    print(headline(trained))
    print(f"done in {time.time() - start:.0f} s (training {train_s:.0f} s).\n"
          f"  checkpoints:  {ckpt_dir}\n  metrics:      {run_dir / 'metrics.jsonl'}\n"
          f"  retrieval:    {run_dir / 'retrieval.json'}\n"
          f"  TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0
