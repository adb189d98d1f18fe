"""``albef-data``: build and look at training data.

  download     a URL list (CC3M/CC12M/SBU as distributed) -> images with img2dataset (the
               "download" extra), ready for convert
  convert      web caption data (img2dataset webdataset/parquet/files, TSV/CSV, COCO-style
               JSON, Parquet/Arrow with image bytes) -> MDS shards + manifest + stats
  merge        join the parts written by array tasks (or a resumed run) into one dataset
  synth        a procedural shapes dataset (train shards, val/test retrieval splits)
  synth-tasks  synthetic VQA, NLVR2, SNLI-VE and grounding sets from the same scenes
  grounding-boxes  join RefCOCO+ refs, COCO boxes and detections into the grounding eval layout
  inspect      counts, histograms and a contact-sheet PNG of a converted dataset
  bench        loader throughput (pairs/s) by number of workers, with and without RandAugment
  build-vocab  train a WordPiece vocabulary offline from caption files

Heavy modules are imported by each subcommand, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something: not for a required option, a default of
    None (the help says what happens then), a flag of a pair (--header/--no-header), or a
    help text that states its default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.required or action.default in (None, argparse.SUPPRESS) or "default" in text
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        return super()._get_help_string(action)


#: exit status of a convert that ran but kept no pair (2: an input that cannot be read at all)
EXIT_NOTHING_KEPT = 1
#: exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a program SIGINT ended
EXIT_INTERRUPTED = 130


def _add_convert(sub):
    p = sub.add_parser(
        "convert", help="convert image-caption inputs into MDS shards",
        description="Convert image-caption inputs into MDS shards (streaming.MDSWriter), with "
                    "manifest.parquet, stats.json and rejects.jsonl. Resumable: re-run the same "
                    "command after a crash and only unfinished parts are redone.",
        formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="input files or folders (one format per run)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--input-format", choices=["webdataset", "files", "parquet", "arrow", "tsv", "csv", "json"],
                   help="input layout (default: detected from the path)")
    p.add_argument("--source", help="source name stored with each pair (default: the input's name)")
    p.add_argument("--image-root", help="folder that relative image paths are relative to "
                                        "(default: the folder of the TSV/CSV/JSON/Parquet file)")
    p.add_argument("--caption-col", help="caption column: name, or 0-based index for header-less TSV/CSV")
    p.add_argument("--image-col", help="image column: path column for TSV/CSV, bytes/struct column for Parquet")
    p.add_argument("--key-col", help="column holding a unique key (default: 'key' if present, else row number)")
    hdr = p.add_mutually_exclusive_group()
    hdr.add_argument("--header", dest="header", action="store_true", default=None,
                     help="TSV/CSV: the first row names the columns (default: detected: a header when a "
                          "column is given by name or the first row holds a known caption/image "
                          "column name)")
    hdr.add_argument("--no-header", dest="header", action="store_false",
                     help="TSV/CSV: no header row (CC3M, CC12M)")
    p.add_argument("--rows-per-unit", type=int, default=10_000,
                   help="rows per unit of work for TSV/JSON/Parquet (the grain of resumption)")
    p.add_argument("--workers", type=int, default=1, help="converter processes on this machine")
    p.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
                   help="split the input into this many array tasks (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--task-id", type=int, default=None,
                   help="this task's index (default: $SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN, or 0)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATH",
                   help="evaluation manifests / annotation JSON / dataset folders: drop every pair "
                        "whose image (by content hash) is in them")
    p.add_argument("--exclude-image-root", help="image root for the --exclude annotation files")
    p.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this (JPEG)")
    p.add_argument("--compression", help="MDS shard compression, e.g. zstd (images are JPEG already: "
                                         "gains are small)")
    p.add_argument("--shard-size", default="64mb", help="MDS shard size limit")
    p.add_argument("--also-parquet", action="store_true",
                   help="also write each part's pairs as pairs.parquet (image bytes + caption)")
    p.add_argument("--no-merge", action="store_true", help="do not merge parts at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_convert(args) -> int:
    from data_tools.convert import INTERRUPTED, ConvertOptions, convert
    from data_tools.readers import ReaderOptions

    task_id = args.task_id
    if task_id is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID")
        task_id = int(env) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)) if env else 0
    opts = ConvertOptions(
        out=args.out, fmt=args.input_format,
        reader=ReaderOptions(source=args.source, image_root=args.image_root, caption_col=args.caption_col,
                             image_col=args.image_col, key_col=args.key_col, header=args.header,
                             rows_per_unit=args.rows_per_unit),
        workers=args.workers, num_tasks=args.num_tasks, task_id=task_id, exclude=tuple(args.exclude),
        exclude_image_root=args.exclude_image_root, max_side=args.max_side,
        compression=args.compression, shard_size=args.shard_size, also_parquet=args.also_parquet,
        progress=not args.no_progress, merge=False if args.no_merge else None)
    try:
        stats = convert(args.inputs, opts)
    except KeyboardInterrupt:
        print(f"albef-data convert: {INTERRUPTED.format(out=args.out)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if stats["nothing_kept"]:
        print(f"albef-data convert: error: {stats['nothing_kept']}", file=sys.stderr)
        return EXIT_NOTHING_KEPT
    return 0


def _add_download(sub):
    p = sub.add_parser(
        "download", help="download the images of a URL list with img2dataset (needs the download extra)",
        description="Download the images of a caption URL list (CC3M: caption<TAB>url, CC12M: "
                    "url<TAB>caption, SBU: its two files pasted together, or any TSV/CSV/Parquet/JSON "
                    "with a URL and a caption column) with img2dataset into img2dataset's webdataset "
                    "layout, which 'albef-data convert DIR' reads. Prints URLs tried, downloaded and "
                    "failed by reason and the list's lines accounted for (header + downloaded + "
                    "rejected; each rejected line, with its reason, in OUT/rejects.jsonl), then the "
                    "convert command (or runs it: --convert-to). Re-running the same command resumes. Needs img2dataset: pip install \"albef-ds[download]\".",
        epilog="Example (CC3M): albef-data download Train_GCC-training.tsv --out cc3m_images "
               "--processes 8 --threads 64 --image-size 384 --convert-to shards/cc3m",
        formatter_class=HelpFormatter)
    p.add_argument("url_list", help="TSV/CSV (with or without a header), Parquet, or JSON list / JSON lines")
    p.add_argument("--out", required=True, help="image folder to write (img2dataset's output)")
    p.add_argument("--input-format", choices=["tsv", "csv", "parquet", "json"],
                   help="URL list format (default: from the extension; .txt is TSV)")
    p.add_argument("--url-col", help="URL column: name, or 0-based index without a header "
                                     "(default: url/image_url by name; without a header, of two "
                                     "columns the one holding a URL)")
    p.add_argument("--caption-col", help="caption column: name or 0-based index (default: caption/text "
                                         "by name; without a header, the other of two columns)")
    hdr = p.add_mutually_exclusive_group()
    hdr.add_argument("--header", dest="header", action="store_true", default=None,
                     help="TSV/CSV: the first row names the columns")
    hdr.add_argument("--no-header", dest="header", action="store_false",
                     help="TSV/CSV: no header row (CC3M, CC12M); default: no header when the first "
                          "row holds a URL")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize so the shorter side is at most this (JPEG, quality 95); default: store "
                        "images exactly as served")
    p.add_argument("--processes", type=int, default=1, help="img2dataset download processes")
    p.add_argument("--threads", type=int, default=32, help="download threads per process")
    p.add_argument("--timeout", type=int, default=10, help="seconds per request")
    p.add_argument("--retries", type=int, default=0, help="retries of a failed request")
    p.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="URLs per img2dataset shard (one tar; one convert unit)")
    p.add_argument("--convert-to", metavar="SHARDS",
                   help="then run 'albef-data convert OUT --out SHARDS' on what was downloaded")
    p.add_argument("--workers", type=int, default=1, help="with --convert-to: converter processes")
    p.add_argument("--no-progress", action="store_true", help="with --convert-to: no convert progress bar")


def _run_download(args) -> int:
    from data_tools.download import DownloadOptions, download, nothing_downloaded_message

    opts = DownloadOptions(out=args.out, fmt=args.input_format, url_col=args.url_col,
                           caption_col=args.caption_col, header=args.header, image_size=args.image_size,
                           processes=args.processes, threads=args.threads, timeout=args.timeout,
                           retries=args.retries, samples_per_shard=args.samples_per_shard)
    totals = download(args.url_list, opts)
    if not totals["downloaded"]:
        print(f"albef-data download: error: {nothing_downloaded_message(totals, args.out)}", file=sys.stderr)
        return EXIT_NOTHING_KEPT
    if not args.convert_to:
        shards = args.out.rstrip("/") + "_shards"
        print(f"next: albef-data convert {args.out} --out {shards}", file=sys.stderr)
        return 0
    print(f"download: albef-data convert {args.out} --out {args.convert_to}", file=sys.stderr)
    return _run_convert(_add_convert_defaults(inputs=[args.out], out=args.convert_to, input_format="webdataset",
                                              workers=args.workers, no_progress=args.no_progress))


def _add_convert_defaults(**given) -> argparse.Namespace:
    """The convert command's arguments, defaults and all, with ``given`` set."""
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    _add_convert(sub)
    args = sub.choices["convert"].parse_args(["x", "--out", "x"])
    for k, v in given.items():
        setattr(args, k, v)
    return args


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge finished parts into one dataset",
                       description="Merge every finished part under DIR: index.json (streaming's "
                                   "merge_index), manifest.parquet, stats.json, rejects.jsonl.")
    p.add_argument("dir", help="dataset folder written by convert (all array tasks)")


def _run_merge(args) -> int:
    from data_tools.merge import merge
    merge(args.dir)
    return 0


def _add_synth(sub):
    p = sub.add_parser("synth", help="write a procedural shapes image-caption dataset",
                       description="Procedural images (shapes, colours, sizes, counts, left/right/"
                                   "above/below relations) with paraphrased captions; deterministic "
                                   "by seed. Writes DIR/train (MDS), DIR/val.json, DIR/test.json, "
                                   "DIR/compositional.json (true caption + binding-swapped "
                                   "distractors per image), DIR/images/ and DIR/captions.txt.",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same dataset")
    p.add_argument("--num-train", type=int, default=20_000, help="train images")
    p.add_argument("--train-captions-per-image", type=int, default=1,
                   help="train pairs per image (distinct paraphrases, same image_id)")
    p.add_argument("--num-val", type=int, default=500, help="val images")
    p.add_argument("--num-test", type=int, default=1000, help="test images")
    p.add_argument("--captions-per-image", type=int, default=5, help="captions per val/test image")
    p.add_argument("--num-compositional", type=int, default=500,
                   help="images of the compositional test (compositional.json; 0: none)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes drawing images (default: this machine's CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_synth(args) -> int:
    from data_tools.synth import SynthOptions, synth
    synth(SynthOptions(out=args.out, seed=args.seed, num_train=args.num_train,
                       train_captions_per_image=args.train_captions_per_image, num_val=args.num_val,
                       num_test=args.num_test, captions_per_image=args.captions_per_image,
                       num_compositional=args.num_compositional,
                       image_size=args.image_size, workers=args.workers, progress=not args.no_progress))
    return 0


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="summarise a dataset and draw a contact sheet",
                       description="Counts per source, caption-length and image-size histograms "
                                   "(from manifest.parquet) and a contact-sheet PNG of sampled pairs.")
    p.add_argument("dir", help="dataset folder (with manifest.parquet and index.json)")
    p.add_argument("--png", help="contact sheet path (default: DIR/contact_sheet.png)")
    p.add_argument("--samples", type=int, default=24, help="pairs on the contact sheet")
    p.add_argument("--seed", type=int, default=0, help="which pairs are sampled for the contact sheet")
    p.add_argument("--font", action="append", metavar="FILE",
                   help="a TrueType/OpenType font (.ttf/.otf/.ttc) for the captions; repeat it to give "
                        "several: each character is drawn with the first that has it, then DejaVuSans "
                        "(matplotlib's or the system's), then any installed font fontconfig finds for it "
                        "(e.g. Noto CJK); characters no font has are named")


def _run_inspect(args) -> int:
    from data_tools.inspect_data import inspect_dataset
    inspect_dataset(args.dir, png=args.png, samples=args.samples, seed=args.seed, font_paths=args.font)
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="loader (and converter) throughput in pairs/s",
                       description="Time the training loader (pairs/s) for each worker count, "
                                   "with and without RandAugment; optionally the converter.",
                       formatter_class=HelpFormatter)
    p.add_argument("dir", help="MDS dataset folder")
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    p.add_argument("--image-res", type=int, default=256, help="training crop side in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch")
    p.add_argument("--batches", type=int, default=20, help="batches timed per setting (after 2 warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    p.add_argument("--tokenizer", help="tokenizer folder (default: a vocabulary built from the captions)")
    p.add_argument("--modes", default="crop,randaugment",
                   help="comma list of: crop (RandomResizedCrop + flip), randaugment (+ ALBEF RandAugment)")
    p.add_argument("--convert", metavar="INPUT", help="also time converting INPUT (pairs/s per worker)")
    p.add_argument("--convert-workers", default="1,2", help="with --convert: comma-separated converter process counts")
    p.add_argument("--convert-rows-per-unit", type=int, default=500,
                   help="units small enough that every converter worker gets some")
    p.add_argument("--json", help="write the results as JSON here")


def _run_bench(args) -> int:
    from data_tools.bench import run_bench
    run_bench(args)
    return 0


def _add_vocab(sub):
    p = sub.add_parser("build-vocab", help="train a WordPiece vocabulary offline",
                       description="Train a lower-case BERT WordPiece vocabulary ([PAD]=0, [UNK], "
                                   "[CLS], [SEP], [MASK]) from caption text files (one caption per "
                                   "line) or dataset folders with manifest.parquet; writes a folder "
                                   "that transformers' BertTokenizerFast loads.",
                       formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="caption .txt files or dataset folders")
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=1024, help="WordPiece vocabulary size, special tokens included")

def _add_synth_tasks(sub):
    p = sub.add_parser("synth-tasks", help="write synthetic VQA / NLVR2 / SNLI-VE / grounding sets",
                       description="Downstream-task versions of the synth scenes, in the reference "
                                   "ALBEF JSON layouts: ve_*.json, vqa_*.json + answer_list.json, "
                                   "nlvr_*.json, grounding_*.json (with boxes and proposals for "
                                   "val/test) and images/. Labels, answers and boxes come from what "
                                   "the generator drew. Deterministic by seed.",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the tasks' JSON files and images into")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same tasks")
    p.add_argument("--num-train", type=int, default=2000, help="train images")
    p.add_argument("--num-val", type=int, default=200, help="val (dev) images")
    p.add_argument("--num-test", type=int, default=200, help="test images")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_synth_tasks(args) -> int:
    from data_tools.synth_tasks import SynthTaskOptions, synth_tasks
    synth_tasks(SynthTaskOptions(out=args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                 num_test=args.num_test, image_size=args.image_size, progress=not args.no_progress))
    return 0


def _add_grounding_boxes(sub):
    p = sub.add_parser("grounding-boxes", help="RefCOCO+ eval JSON + REFER refs + COCO boxes + detections "
                                               "-> the layout albef-ds eval --task grounding reads",
                       description="Add each entry's true box (its COCO annotation's bbox), its image's "
                                   "detector proposals and its split (val/testA/testB) to the reference's "
                                   "refcoco+_{val,test}.json (docs/tasks.md).")
    p.add_argument("annotation", help="refcoco+_val.json or refcoco+_test.json (the reference's data.tar.gz)")
    p.add_argument("--refs", required=True, help="the REFER toolkit's refcoco+/refs(unc).p")
    p.add_argument("--instances", required=True, help="refcoco+/instances.json (COCO annotations)")
    p.add_argument("--dets", required=True, help="the reference's refcoco+/dets.json (proposals per image)")
    p.add_argument("--out", required=True, help="output JSON")


def _run_grounding_boxes(args) -> int:
    from pathlib import Path

    from data_tools.grounding_boxes import join_boxes
    join_boxes(Path(args.annotation), Path(args.refs), Path(args.instances), Path(args.dets), Path(args.out))
    return 0


def _run_vocab(args) -> int:
    from data_tools.vocab import build_vocab_cmd
    build_vocab_cmd(args.inputs, args.out, args.vocab_size)
    return 0


COMMANDS = {
    "download": (_add_download, _run_download),
    "convert": (_add_convert, _run_convert),
    "merge": (_add_merge, _run_merge),
    "synth": (_add_synth, _run_synth),
    "synth-tasks": (_add_synth_tasks, _run_synth_tasks),
    "grounding-boxes": (_add_grounding_boxes, _run_grounding_boxes),
    "inspect": (_add_inspect, _run_inspect),
    "bench": (_add_bench, _run_bench),
    "build-vocab": (_add_vocab, _run_vocab),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="albef-data", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     epilog="Run 'albef-data COMMAND --help' for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


#: what every command but download imports (streaming's package imports torch, torchvision
#: and transformers): made before the work when it runs as a program (:func:`program`)
IMPORTS = ("torch", "torchvision", "transformers", "streaming", "pyarrow", "PIL.Image")


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run one command; its exit status. ``own_process``: this process exists for it
    (:func:`program`), so its heavy imports are made with the collector off and frozen."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if own_process and args.command != "download":
            from albef_ds import startup
            startup.import_before_work(IMPORTS)
        from data_tools.download import MissingExtraError
        from data_tools.readers import InputError

        try:
            return int(COMMANDS[args.command][1](args) or 0)
        except (InputError, FileNotFoundError, MissingExtraError) as e:
            print(f"albef-data {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # Ctrl-C outside a command's own answer (convert's): no traceback
        print(f"albef-data {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def program() -> None:
    """``albef-data``: :func:`main` in a process of its own (start-up and exit without the
    cyclic collector's cost: albef_ds/startup.py)."""
    code = main(own_process=True)
    from albef_ds import startup
    startup.before_exit()
    sys.exit(code)


if __name__ == "__main__":
    program()
