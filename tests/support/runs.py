"""The pretraining runs the tests assert on, declared once and launched once per session.

``LAUNCHES`` is the table (in the spirit of torchtitan's integration-test features): each
entry is one distinct run of the shared recipe (:func:`pretrain_args`: the tiny preset cut
to 2 + 2 layers, lr 1e-3, checkpoints every 4 steps, sample keys logged, global batch 16)
on the session's synth shards, with its ranks, steps, DeepSpeed config, overrides and the
checkpoint it resumes from. ``Runs.get(name)`` launches it the first time a test asks
(after what it resumes from) and hands every later test the same result. Runs that need
more than a launch (a kill at a moment, a damaged copy) are procedures in the test module
that owns them, memoised the same way (``Runs.once``).

1-rank runs go through :func:`in_process` (``albef_ds.cli.main`` in the pytest process:
the same code path as ``python -m albef_ds``, without paying the imports and engine set-up
of a new process); several ranks through tests/support/drivers/ranks.py (the variables a
launcher gives each rank, without the deepspeed launcher's two extra interpreters).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tests.support.launch import albef_command, call, in_process

#: micro-batch x ranks: the global batch of every run of the recipe
GLOBAL_BATCH = 16
#: the FSDP2 engine instead of DeepSpeed (albef_ds/train/engines/fsdp2.py)
FSDP2 = "distributed.engine=fsdp2"
#: a ZeRO-3 fp32 config whose small parameters stay whole (the EMA's two paths both run)
ZERO3_T100 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
              "steps_per_print": 1000000}


def pretrain_args(run_dir: Path, data: Path, tok: Path, ranks: int, steps: int, extra=()) -> list[str]:
    """``pretrain`` arguments of the shared recipe."""
    sets = [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}", f"train.max_steps={steps}",
            f"train.micro_batch_size={GLOBAL_BATCH // ranks}", "train.lr=1e-3", "train.warmup_steps=2",
            "model.momentum=0.9", "model.vision_depth=2", "model.text_depth=2", "model.fusion_layer=1",
            "logging.log_every=1", "checkpoint.every_steps=4", "checkpoint.keep_last=10",
            "logging.log_sample_keys=true", "logging.progress_bar=false", "logging.tensorboard=false"]
    return ["pretrain", "--config", "tiny", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)],
            *extra]


def small_run_args(run_dir, data: Path, tok: Path, *extra: str, steps: int = 6) -> list[str]:
    """``pretrain`` arguments of a smaller 1-rank recipe (log and checkpoint every 2 steps,
    keep 2): the run-directory, export and text-form tests."""
    sets = [f"data.train_dirs=[{data / 'train'}]", f"data.tokenizer={tok}", f"train.max_steps={steps}",
            "train.micro_batch_size=8", "model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1",
            "logging.log_every=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "logging.tensorboard=false"]
    return ["pretrain", "--config", "tiny", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)],
            *extra]


def per_step(run_dir: Path) -> dict:
    """step -> the last metrics line logged at it (a resumed run appends; its marker row,
    ``event: resume``, is no step's metrics)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "event" not in row:
            out[row["step"]] = row
    return out


def keys(run_dir: Path, rank: int) -> dict:
    """(step, micro) -> sample keys consumed by that rank (last occurrence wins)."""
    out = {}
    for line in (run_dir / f"sample_keys_rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[(row["step"], row["micro"])] = row["keys"]
    return out


@dataclass(frozen=True)
class Launch:
    """One run of the recipe. ``ds``: a shipped DeepSpeed config, or "zero3_t100";
    ``resume``: "<launch>@<step>", that launch's checkpoint (launched first)."""
    ranks: int
    steps: int
    ds: str = "zero2_fp32"
    sets: tuple = ()
    resume: Optional[str] = None
    doc: str = ""


LAUNCHES: dict[str, Launch] = {
    "z2_w1": Launch(1, 4, doc="checkpoint bytes at 1 rank"),
    "z2_w2": Launch(2, 20, doc="the reference trajectory of 2 ranks: every ZeRO stage's peer, kill -9 and "
                              "resume, universal 2 -> 1, export; checkpoint bytes at 2 ranks"),
    "z2_w4": Launch(4, 8, doc="checkpoint bytes at 4 ranks; the 4 -> 2 resume's and the failing job's source"),
    "z1_w2": Launch(2, 20, ds="zero1_bf16", doc="ZeRO-1 bf16 trains and saves"),
    "z3_w1": Launch(1, 4, ds="zero3_t100", doc="ZeRO-3 checkpoint bytes at 1 rank"),
    "z3_w2": Launch(2, 20, ds="zero3_t100", doc="ZeRO-3 (partitioned and persistent momentum) against z2_w2; "
                                               "checkpoint bytes at 2 ranks"),
    "z3_w4": Launch(4, 4, ds="zero3_t100", doc="ZeRO-3 checkpoint bytes at 4 ranks; a rank file removed: refused"),
    "z2_w2_to1": Launch(1, 16, resume="z2_w2@12", doc="universal 2 -> 1: the same global samples per step"),
    "z2_w4_to2": Launch(2, 8, resume="z2_w4@4", doc="universal 4 -> 2: the same global samples per step"),
    "f2_w1": Launch(1, 4, sets=(FSDP2,), doc="FSDP2: DCP checkpoint bytes at 1 rank"),
    "f2_w2": Launch(2, 8, sets=(FSDP2,), doc="FSDP2: the reference trajectory of 2 ranks; bytes at 2 ranks"),
    "f2_w4": Launch(4, 8, sets=(FSDP2,), doc="FSDP2: bytes at 4 ranks; the 4 -> 2 resume's source"),
    "f2_w2_again": Launch(2, 8, sets=(FSDP2,), resume="f2_w2@4",
                          doc="FSDP2: resume on the same world size (a new run dir): bit-exact"),
    "f2_w4_to2": Launch(2, 8, sets=(FSDP2,), resume="f2_w4@4",
                        doc="FSDP2 4 -> 2 without a conversion: the same global samples per step"),
}


@dataclass
class Result:
    dir: Path
    log: Path
    code: int
    text: str


@dataclass
class Runs:
    """The session's launches (``get``) and procedures (``once``), each run once."""
    root: Path
    data: Path
    tok: Path
    done: dict = field(default_factory=dict)

    def ds_config(self, name: str) -> str:
        if name == "zero3_t100":
            path = self.root / "zero3_fp32_t100.json"
            path.write_text(json.dumps(ZERO3_T100))
            return str(path)
        return f"ds_configs/{name}.json"

    def checkpoint(self, spec: str) -> Path:
        """"<launch>@<step>" -> that launch's checkpoint folder (launched if need be)."""
        name, step = spec.split("@")
        return self.get(name).dir / "checkpoints" / f"step_{int(step):08d}"

    def args(self, name: str, run_dir: Path, extra=()) -> list[str]:
        spec = LAUNCHES[name]
        extra = ["--set", f"distributed.ds_config={self.ds_config(spec.ds)}",
                 *[a for s in spec.sets for a in ("--set", s)], *extra]
        if spec.resume:
            extra += ["--resume", str(self.checkpoint(spec.resume))]
        return pretrain_args(run_dir, self.data, self.tok, spec.ranks, spec.steps, extra)

    def get(self, name: str) -> Result:
        if name not in self.done:
            spec = LAUNCHES[name]
            run_dir, log = self.root / name, self.root / f"{name}.log"
            args = self.args(name, run_dir)
            if spec.ranks == 1:
                code, text = in_process(args, log)
                assert code == 0, f"{name} exited {code}:\n{text[-5000:]}"
            else:
                code, text = call(albef_command(spec.ranks, args), log)
            self.done[name] = Result(run_dir, log, code, text)
        return self.done[name]

    def once(self, name: str, procedure: Callable[["Runs"], object]):
        """``procedure(self)``'s result, computed the first time ``name`` is asked for."""
        if name not in self.done:
            self.done[name] = procedure(self)
        return self.done[name]
