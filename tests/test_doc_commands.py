"""Every shell command of README.md and docs/tasks.md runs as written, at small sizes, with the
paths it names (issue 30: the README's fine-tune example had failed as written).

The commands are read from the documents' ```bash blocks (a trailing backslash continues a
line, ``&&`` separates two commands, ``#`` starts a comment). Each must match exactly one
entry of :data:`RECIPES`, which says how this suite shows that it runs:

- ``run``: in a workspace that holds the inputs the document names (made by the chain's
  ``inputs_*`` function from small synthetic data), in the order of :data:`RECIPES`, after
  :func:`at_small_size`: a model of widths 64 and 1 + 2 + 1 layers (albef-base's too),
  2 ranks for 8, 96 px for 384, two optimizer steps, a few dozen pairs. Nothing else is changed: a wrong path, a missing
  required setting or a flag that does not exist fails the chain, naming the document's line.
- ``ci``: what .ci/run itself runs (the install and the test command): checked to be the
  same text.
- ``covered``: run elsewhere in the suite under the variables of this machine (the SLURM
  script needs the local cluster, the GPU check's dry run takes a minute): the test named
  must exist and launch it.
- ``not_here``: cannot run on this machine; the reason says why.

A command added to a document without a recipe fails :func:`test_every_command_has_one_recipe`.
"""
from __future__ import annotations

import json
import pickle
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import tests.support.formats as F
from tests.support.launch import REPO, env, in_process, synth_tasks
from tests.support.web import serving

DOCUMENTS = ("README.md", "docs/tasks.md")


@dataclass(frozen=True)
class DocCommand:
    document: str
    line: int
    argv: tuple

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


def doc_commands(document: str) -> list[DocCommand]:
    """The commands of a document's ```bash blocks, with the line each starts on."""
    lines = (REPO / document).read_text().splitlines()
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash" and not in_block
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(pending + line, comments=True)
        pending = ""
        argv = []
        for token in tokens + ["&&"]:
            if token != "&&":
                argv.append(token)
            elif argv:
                commands.append(DocCommand(document, start, tuple(argv)))
                argv = []
    return commands


@dataclass(frozen=True)
class Recipe:
    #: a regular expression the command's text (shlex-joined) must match from its start
    pattern: str
    #: run | ci | covered | not_here
    how: str
    #: run: the chain (one test, one workspace) it runs in; covered: the test file that runs it
    where: str = ""
    #: not_here: why
    reason: str = ""
    #: run: in the chain's workspace, or in the repository (the test commands)
    in_repo: bool = False


RECIPES = (
    # README: installing, testing
    Recipe(r"pip install -e '\.\[dev\]'$", "ci"),
    Recipe(r"python -m pytest -x -q -n 3 --dist loadgroup --durations=25 tests$", "ci"),
    Recipe(r"pip install torch torchvision --index-url https://download\.pytorch\.org/whl/cpu$", "not_here",
           reason="this machine reaches the package registries only, not PyTorch's index"),
    # chain "tasks": the demo's run, then every task fine-tuned from it (README)
    Recipe(r"python -m pytest -q -m 'not slow' tests$", "run", "tasks", in_repo=True),
    Recipe(r"albef-ds demo$", "run", "tasks"),
    Recipe(r"albef-data synth-tasks --out data/tasks$", "run", "tasks"),
    Recipe(r"albef-ds finetune --task ve --config tiny --init runs/demo/run", "run", "tasks"),
    Recipe(r"albef-ds eval --task ve --model runs/ve --split data/tasks/ve_test\.json", "run", "tasks"),
    Recipe(r"albef-ds finetune --task vqa --config tiny", "run", "tasks"),
    Recipe(r"albef-ds finetune --task nlvr_ta --config tiny", "run", "tasks"),
    Recipe(r"albef-ds finetune --task nlvr2 --config tiny", "run", "tasks"),
    Recipe(r"albef-ds finetune --task grounding --config tiny", "run", "tasks"),
    Recipe(r"albef-ds eval --task grounding --model runs/grounding", "run", "tasks"),
    # chain "data": URL list, TSV, img2dataset output, COCO JSON -> shards (README)
    Recipe(r"albef-data download Train_GCC-training\.tsv", "run", "data"),
    Recipe(r"albef-data convert sbu/captions\.tsv", "run", "data"),
    Recipe(r"albef-data convert img2dataset_out/", "run", "data"),
    Recipe(r"albef-data convert coco_karpathy_train\.json", "run", "data"),
    Recipe(r"albef-data build-vocab shards/cc3m", "run", "data"),
    Recipe(r"albef-data inspect shards/cc3m", "run", "data"),
    # chain "pretrain": every launcher, then evaluation, export and the tools (README)
    Recipe(r"albef-data synth --out shards/synth$", "run", "pretrain"),
    Recipe(r"albef-data build-vocab shards/synth/captions\.txt --out tok/$", "run", "pretrain"),
    Recipe(r"albef-ds pretrain --config configs/tiny\.yaml", "run", "pretrain"),
    Recipe(r"deepspeed --num_gpus 8 --module albef_ds pretrain", "run", "pretrain"),
    Recipe(r"torchrun --nproc_per_node 8 -m albef_ds pretrain", "run", "pretrain"),
    Recipe(r"sbatch slurm/pretrain\.sbatch$", "covered", "tests/slurm/test_pretrain_sbatch.py"),
    Recipe(r"albef-ds eval-retrieval --model runs/albef-base", "run", "pretrain"),
    Recipe(r"albef-ds finetune --task retrieval --config albef-base", "run", "pretrain"),
    Recipe(r"albef-ds export runs/albef-base$", "run", "pretrain"),
    Recipe(r"albef-ds model-info --config configs/albef-base\.yaml --check-flops$", "run", "pretrain"),
    Recipe(r"albef-ds bench --config tiny$", "run", "pretrain"),
    Recipe(r"albef-ds bench --config tiny --engine-free --compare reference fast$", "run", "pretrain"),
    Recipe(r"albef-ds gpu-check --dry-run --out gc/$", "covered", "tests/cli/test_gpu_check.py"),
    # chain "task_pages": one command per task from the reference's checkpoint (docs/tasks.md)
    Recipe(r"albef-data grounding-boxes data/refcoco\+_val\.json", "run", "task_pages"),
    Recipe(r"albef-ds finetune --task ve --config albef-base --init ALBEF\.pth", "run", "task_pages"),
    Recipe(r"albef-ds eval --task ve --model runs/ve --split data/ve_test\.json", "run", "task_pages"),
    Recipe(r"albef-ds finetune --task nlvr_ta --config albef-base", "run", "task_pages"),
    Recipe(r"albef-ds finetune --task nlvr2 --config albef-base", "run", "task_pages"),
    Recipe(r"albef-ds finetune --task vqa --config albef-base", "run", "task_pages"),
    Recipe(r"albef-ds eval --task vqa --model runs/vqa", "run", "task_pages"),
    Recipe(r"albef-ds finetune --task grounding --config albef-base", "run", "task_pages"),
    Recipe(r"albef-ds eval --task grounding --model runs/ground --", "run", "task_pages"),
)

#: what a covered command looks like in the test file that runs it
COVERED_BY = {"sbatch slurm/pretrain.sbatch": {"tests/support/slurm.py": ('sbatch(', '"pretrain.sbatch"'),
                                                "tests/slurm/test_pretrain_sbatch.py": ("submit_pretrain",)},
              "albef-ds gpu-check --dry-run --out gc/": {
                  "tests/cli/test_gpu_check.py": ('"gpu-check", "--dry-run", "--out"',)}}


def all_commands() -> list[DocCommand]:
    return [c for document in DOCUMENTS for c in doc_commands(document)]


def recipes_of(command: DocCommand) -> list[Recipe]:
    return [r for r in RECIPES if re.match(r.pattern, command.text)]


def test_every_command_has_one_recipe_and_every_recipe_a_command():
    commands = all_commands()
    assert len(commands) >= 30, [str(c) for c in commands]  # the parser found the blocks
    unmatched = [str(c) for c in commands if len(recipes_of(c)) != 1]
    assert not unmatched, "commands with no recipe (or several) in tests/test_doc_commands.py:\n" + \
        "\n".join(unmatched)
    stale = [r.pattern for r in RECIPES if not any(re.match(r.pattern, c.text) for c in commands)]
    assert not stale, f"recipes whose command is no longer in the documents: {stale}"
    elided = [str(c) for c in commands if "..." in c.argv]
    assert not elided, f"commands that cannot run as written: {elided}"


def test_the_install_and_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = re.search(r"^TEST_CMD=\((.*)\)$", ci, re.MULTILINE).group(1)
    for command in all_commands():
        (recipe,) = recipes_of(command)
        if recipe.how != "ci":
            continue
        if command.argv[:2] == ("python", "-m"):
            assert command.text == test_cmd, (str(command), test_cmd)
        else:
            assert f"\n{command.text} </dev/null\n" in ci.replace('".[dev]"', "'.[dev]'"), str(command)


def test_the_covered_commands_are_launched_by_the_tests_named():
    for command in all_commands():
        (recipe,) = recipes_of(command)
        if recipe.how == "covered":
            for path, pieces in COVERED_BY[command.text].items():
                source = (REPO / path).read_text()
                for piece in pieces:
                    assert piece in source, (str(command), path, piece)


# -- running them ----------------------------------------------------------------------------

#: any preset's model (albef-base's too) at a size that takes a second a step here: widths of
#: 64, 1 vision block, 2 text + 1 fusion layers, a 64-entry queue, one loader worker
SMALL_MODEL = ("model.vision_width=64", "model.vision_depth=1", "model.vision_heads=2", "model.text_width=64",
               "model.text_depth=2", "model.text_heads=2", "model.text_intermediate=128", "model.fusion_layer=1",
               "model.embed_dim=32", "model.queue_size=64", "data.num_workers=1")
#: a run of two optimizer steps, checkpointed at its end, with no progress bar
SMALL_RUN = ("train.max_steps=2", "train.micro_batch_size=4", "checkpoint.every_steps=2",
             "logging.progress_bar=false", "logging.tensorboard=false", "eval.max_images=8")
#: extra arguments, by program and subcommand
SMALL_ARGS = {
    ("albef-ds", "demo"): ["--train-pairs", "64", "--test-images", "8", "--steps", "2"],
    ("albef-data", "synth"): ["--num-train", "64", "--num-val", "8", "--num-test", "8", "--no-progress"],
    ("albef-data", "synth-tasks"): ["--num-train", "8", "--num-val", "4", "--num-test", "4", "--no-progress"],
    ("albef-data", "build-vocab"): ["--vocab-size", "300"],
    ("albef-ds", "bench"): ["--steps", "1", "--warmup", "0", "--batch", "4", "--no-phases"],
    ("python", "-m"): ["--collect-only"],
}


def at_small_size(argv: tuple) -> list[str]:
    """The command as written, at the sizes of this machine (see the module's docstring)."""
    out = []
    for token in argv:
        out.append(token.replace("model.image_res=384", "model.image_res=96"))
    for flag in ("--num_gpus", "--nproc_per_node"):
        if flag in out:
            out[out.index(flag) + 1] = "2"
    program_at = 0 if out[0] in ("albef-ds", "albef-data", "python") else out.index("albef_ds")
    program = "albef-ds" if out[program_at] == "albef_ds" else out[program_at]
    sub = out[program_at + 1] if program_at + 1 < len(out) else ""
    out += SMALL_ARGS.get((program, sub), [])
    if program == "albef-ds" and sub in ("pretrain", "finetune", "demo", "bench", "model-info"):
        for setting in SMALL_MODEL + (SMALL_RUN if sub in ("pretrain", "finetune") else ()):
            out += ["--set", setting]
    return out


def run_in(workspace: Path, command: DocCommand, recipe: Recipe) -> str:
    """Run the command in ``workspace``: albef-ds / albef-data in this process (the same
    ``main`` their console scripts call), launchers and pytest as processes."""
    argv = at_small_size(command.argv)
    if argv[0] in ("albef-ds", "albef-data"):
        code, out = in_process(argv[1:], cwd=workspace, program=argv[0])
    else:
        proc = subprocess.run(argv, check=False, cwd=REPO if recipe.in_repo else workspace, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        code, out = proc.returncode, proc.stdout
    assert code == 0, f"{command}\n  ran as: {shlex.join(argv)}\n  exit {code}:\n{out[-4000:]}"
    return out


def run_chain(chain: str, workspace: Path) -> dict[str, str]:
    commands = all_commands()
    outputs = {}
    for recipe in RECIPES:
        if recipe.how == "run" and recipe.where == chain:
            for command in commands:
                if re.match(recipe.pattern, command.text):
                    outputs[recipe.pattern] = run_in(workspace, command, recipe)
    return outputs


def _copy_split(data: Path, split: str, json_to: Path, image_root: Path):
    """A synth split's JSON at ``json_to``, its images under ``image_root``."""
    json_to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / f"{split}.json", json_to)
    if not (image_root / "images").exists():
        shutil.copytree(data / "images", image_root / "images")


def inputs_pretrain(ws: Path, data: Path, tok: Path):
    for name in ("cc3m", "cc12m", "coco"):
        shutil.copytree(data / "train", ws / "shards" / name)
    shutil.copytree(tok, ws / "bert-base-uncased")
    _copy_split(data, "test", ws / "flickr30k_test.json", ws / "flickr")
    _copy_split(data, "val", ws / "flickr30k_val.json", ws)


def inputs_data(ws: Path, base_url: str, www: Path):
    lines = []
    for i in range(4):
        (www / f"{i}.jpg").write_bytes(F.jpeg(i))
        lines.append(f"a served picture number {i}\t{base_url}/{i}.jpg")
    (ws / "Train_GCC-training.tsv").write_text("\n".join(lines) + "\n")
    F.caption_tsv(str(ws / "sbu" / "captions.tsv"), str(ws / "sbu"))
    F.img2dataset_webdataset(str(ws / "img2dataset_out"))
    F.coco_json(str(ws / "coco" / "coco_karpathy_train.json"))
    shutil.move(ws / "coco" / "coco_karpathy_train.json", ws / "coco_karpathy_train.json")
    (ws / "flickr_test.json").write_text(json.dumps([{"image": "flickr30k-images/1.jpg", "caption": ["a dog"]}]))
    F.write_file(str(ws / "flickr" / "flickr30k-images" / "1.jpg"), F.jpeg(99))


def inputs_task_pages(ws: Path, data: Path, tok: Path):
    """The reference's file names: ALBEF.pth (a 2-step tiny run's reference-layout export),
    a tokenizer folder, each task's JSON under data/ with its images under the root the page
    names, and RefCOCO+ as the reference ships it (boxes in refs(unc).p / instances / dets)."""
    source = ws / "source_run"
    code, out = in_process(["pretrain", "--config", "albef-base", "--run-dir", source,
                            "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}",
                            *[a for s in SMALL_MODEL + SMALL_RUN for a in ("--set", s)]])
    assert code == 0, out[-3000:]
    code, out = in_process(["export", source])
    assert code == 0, out[-3000:]
    shutil.copy(next((source / "exports").glob("step_*/albef.pth")), ws / "ALBEF.pth")
    shutil.copytree(tok, ws / "bert-base-uncased")
    shutil.copytree(data / "train", ws / "shards" / "cc3m")
    tasks = ws / "synth_tasks"
    synth_tasks(tasks, 8, 4, 4)
    d = ws / "data"
    d.mkdir()
    copies = {"ve_train": "ve_train", "ve_dev": "ve_dev", "ve_test": "ve_test", "nlvr_train": "nlvr_train",
              "nlvr_dev": "nlvr_dev", "vqa_train": "vqa_train", "vqa_val": "vqa_val", "vqa_test": "vqa_test",
              "answer_list": "answer_list", "grounding_train": "refcoco+_train",
              "grounding_test": "refcoco+_test_boxes"}
    for src, dst in copies.items():
        shutil.copy(tasks / f"{src}.json", d / f"{dst}.json")
    shutil.copy(tasks / "vqa_train.json", d / "vg_qa.json")
    for root in ("flickr30k", "nlvr2", "coco_vg", "coco"):
        shutil.copytree(tasks / "images", d / root / "images")
    val = json.loads((tasks / "grounding_val.json").read_text())
    refs, annotations, dets = [], [], {}
    for i, entry in enumerate(val):
        image_id = int(re.search(r"(\d+)\.png$", entry["image"]).group(1))
        refs.append({"ref_id": entry["ref_id"], "ann_id": 1000 + i, "image_id": image_id, "split": "val"})
        annotations.append({"id": 1000 + i, "bbox": entry["box"]})
        dets[str(image_id)] = [p + [0.9] for p in entry["proposals"]]
    (d / "refcoco+_val.json").write_text(json.dumps(
        [{"image": e["image"], "text": e["text"], "ref_id": e["ref_id"]} for e in val]))
    (d / "refcoco+").mkdir()
    with open(d / "refcoco+" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (d / "refcoco+" / "instances.json").write_text(json.dumps({"annotations": annotations}))
    (d / "refcoco+" / "dets.json").write_text(json.dumps(dets))


@pytest.fixture
def ws(tmp_path):
    """The chain's workspace: the current directory of its commands."""
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


@pytest.mark.slow
def test_the_readme_data_commands_run(ws, tmp_path):
    pytest.importorskip("img2dataset")
    (tmp_path / "www").mkdir()
    with serving(tmp_path / "www") as base:
        inputs_data(ws, base, tmp_path / "www")
        out = run_chain("data", ws)
    assert (ws / "shards" / "cc3m" / "index.json").is_file() and (ws / "tokenizer" / "vocab.txt").is_file()
    assert "4" in out[r"albef-data download Train_GCC-training\.tsv"]


@pytest.mark.slow
def test_the_readme_pretraining_evaluation_and_tool_commands_run(ws, synth_data):
    inputs_pretrain(ws, *synth_data)
    out = run_chain("pretrain", ws)
    # the README's retrieval fine-tuning names no tokenizer: its --init run's is used, and said
    assert f"note: data.tokenizer: {ws / 'bert-base-uncased'} (the one --init was trained with)" in \
        out[r"albef-ds finetune --task retrieval --config albef-base"]
    assert list((ws / "runs" / "albef-base" / "exports").glob("step_*/albef.pth"))
    assert (ws / "runs" / "base-torchrun" / "metrics.jsonl").is_file()
    assert (ws / "runs" / "retrieval" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_the_readme_demo_and_task_commands_run(ws):
    run_chain("tasks", ws)
    assert (ws / "results" / "ve").is_dir() and list((ws / "results" / "grounding").rglob("*.png"))


@pytest.mark.slow
def test_the_task_page_commands_run(ws, synth_data):
    inputs_task_pages(ws, *synth_data)
    out = run_chain("task_pages", ws)
    done = out[r"albef-ds finetune --task vqa --config albef-base"].splitlines()[-1]
    assert done.startswith("done: 2 steps;") and "TensorBoard" not in done, done  # logging.tensorboard=false
    assert (ws / "data" / "refcoco+_val_boxes.json").is_file()
    assert (ws / "runs" / "vqa" / "test" / "results.json").is_file()
