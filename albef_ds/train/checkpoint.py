"""Checkpoints that survive a kill at any moment, resume on any number of ranks, and are
verified before anything is loaded from them.

Layout under ``RUN_DIR/checkpoints``::

    step_00000200/               a complete checkpoint (renamed from .partial: the commit)
        (the engine's files)     DeepSpeed: module states (rank 0), ZeRO partitions (one per
                                 rank); FSDP2: DCP shards __<rank>_0.distcp, .metadata and
                                 fsdp2_client.pt (rank 0: client state, schedule)
        albef_momentum.pt        fp32 momentum master of the parameters held whole: once
        albef_rank00000.pt       per rank: RNG states, its ZeRO-3 partitions of the master
        albef_queue_pool00000.pt per negatives pool: its queues and pointer
        albef_meta.json          the commit record (below)
    step_00000400.partial/       a save under way (or killed): never resumed from
    universal/step_00000200/     a conversion for another world size, tied to its source
    latest                       the tag of the newest complete checkpoint

**The commit record** (``albef_meta.json``, written last, then the folder renamed): the
step, world size, engine and what it must match (DeepSpeed: ZeRO stage and precision),
negatives pools, the momentum master's partition layout, the config the checkpoint was
trained with, a random ``checkpoint_id``, and every file's
size and CRC-32. Every rank fsyncs the files it checksummed before the record is written;
rank 0 fsyncs the record and the folders around the rename.

**Resume verifies before it loads.** Rank 0 reads the record and checks every file's
presence and size; every rank then checks that it sees the same checkpoint (a caching
shared file system can show ranks different folders) and recomputes the CRC-32 of its
share of the files. ``--resume auto`` takes the newest checkpoint that passes, printing
one line per checkpoint skipped (the file and the reason); a checkpoint asked for by path
that fails is refused with that line. Nothing is written before that.

**Derived state is keyed.** A universal conversion (DeepSpeed's resume on another world
size; FSDP2 reads its DCP shards on any world size and needs none) is
built in a temporary folder of the RESUMING run, renamed when complete, and carries the
``checkpoint_id`` it came from: a stale one (the source re-saved since) or an incomplete
one is rebuilt, never reused. The first save of the resumed run removes it.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .. import distributed as dist_lib
from ..errors import UsageError

#: model buffers that are run state, saved once per negatives pool (they differ between pools)
QUEUE_BUFFERS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")

META = "albef_meta.json"
MOMENTUM_FILE = "albef_momentum.pt"
PARTIAL = ".partial"
TAG_PATTERN = re.compile(r"step_\d{8}")
#: the commit record's format; 2: with the file record (sizes and CRC-32)
RECORD_FORMAT = 2
#: where conversions for another world size live, under the resuming run's checkpoints/
UNIVERSAL_DIR = "universal"
#: written last into a conversion: the checkpoint it was made from
UNIVERSAL_SOURCE = "albef_universal_source.json"
_CHUNK = 8 << 20


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def queue_file_name(pool: int) -> str:
    return f"albef_queue_pool{pool:05d}.pt"


def rank_file_name(rank: int) -> str:
    return f"albef_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str, durable: bool = False) -> None:
    """``text`` into ``path`` through a temporary file and a rename: a reader sees the old
    content or the new, never half; ``durable``: fsynced before the rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def file_crc(path: Path) -> int:
    """CRC-32 of a file's bytes (zlib: ~1 GB/s a core, read in 8 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be saved or resumed from, with the reason and the path."""


def save_error(error: BaseException, folder: Path) -> str:
    """One line for a failed write: ENOSPC named as such (torch's writer reports a full
    disk as '[enforce fail at inline_container.cc] ... unexpected pos ...')."""
    errno_ = getattr(error, "errno", None)
    path = getattr(error, "filename", None) or folder
    try:
        full = shutil.disk_usage(folder if folder.exists() else folder.parent).free < _CHUNK
    except OSError:
        full = False
    if errno_ == errno.ENOSPC or full:
        return f"[Errno {errno.ENOSPC}] ENOSPC: no space left on device writing {path}"
    return f"writing {path} failed: {' '.join(str(error).split())[:300]}"


def read(path: Path):
    """``torch.load`` of one checkpoint file; a damaged file is a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e


#: model fields that set a parameter's or buffer's shape: a resume must not change them.
SHAPE_KEYS = ("image_res", "patch_size", "vision_width", "vision_depth", "vision_heads", "vision_mlp_ratio",
              "vocab_size", "text_width", "text_depth", "text_heads", "text_intermediate",
              "max_position_embeddings", "type_vocab_size", "fusion_layer", "embed_dim", "queue_size",
              "itc_id_positives")


def vocabulary_digest(tokenizer) -> Optional[str]:
    """SHA-256 of the tokenizer's vocabulary (token -> id): two folders with the same
    entries agree, a vocabulary of the same size with other entries does not."""
    if tokenizer is None:
        return None
    import hashlib
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def run_record(cfg, world_size: int, tokenizer=None) -> dict:
    """What a resume must agree with or account for, written into every checkpoint's record:
    the global batch, the shapes, the vocabulary and the whole config it was trained with."""
    return {"global_batch": cfg.global_batch(world_size), "tokenizer": cfg.data.tokenizer,
            "vocabulary_sha256": vocabulary_digest(tokenizer), "text_form": cfg.data.text_form,
            "model": {k: getattr(cfg.model, k) for k in SHAPE_KEYS}, "config": cfg.to_dict()}


def check_resumable(tag_dir: Path, meta: dict, cfg, world_size: int, tokenizer=None) -> list[str]:
    """Every value this run has that differs from the checkpoint's: raise ConfigError
    naming each one the resume cannot honour (before anything is written or loaded);
    return one line per change it applies, saying how (albef_ds.train.resume_settings)."""
    from ..config import ConfigError
    from .resume_settings import classify_changes
    problems = []
    if meta.get("global_batch") not in (None, cfg.global_batch(world_size)):
        problems.append(f"global batch {meta['global_batch']} in the checkpoint, {cfg.global_batch(world_size)} "
                        f"here (train.micro_batch_size x grad_accum_steps x world {world_size}: make them match)")
    saved = meta.get("model", {})
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(cfg.model, key):
            what = f"model.{key}: {saved[key]} in the checkpoint, {getattr(cfg.model, key)} here"
            if key == "vocab_size":
                what += (f" (the tokenizer {cfg.data.tokenizer} has {cfg.model.vocab_size} tokens; the checkpoint "
                         f"was trained with {meta.get('tokenizer')})")
            problems.append(what)
    # a meta without it was written before data.text_form existed: trained on the legacy form
    from ..data.text import LEGACY_TEXT_FORM, text_form_problem
    form = text_form_problem(meta.get("text_form", LEGACY_TEXT_FORM), cfg.data.text_form, "the checkpoint")
    if form:
        problems.append(form)
    digest = vocabulary_digest(tokenizer)
    if not problems and digest and meta.get("vocabulary_sha256") not in (None, digest):
        problems.append(f"data.tokenizer: the vocabulary of {cfg.data.tokenizer} differs from the one the "
                        f"checkpoint was trained with ({meta.get('tokenizer')}), though of the same size")
    from .engines import engine_class
    engine_name = getattr(getattr(cfg, "distributed", None), "engine", "deepspeed")
    saved_engine = meta.get("engine", "deepspeed")  # records older than the engine key: DeepSpeed's
    if saved_engine == engine_name:  # (another engine: refused below, with the config key)
        engine = engine_class(engine_name)
        here = engine.record(cfg, world_size)
        for key, value in here.items():
            saved_value = meta.get(key)
            if saved_value not in (None, value):
                what = key.replace("zero_stage", "ZeRO stage")
                problems.append(f"{what} {saved_value} in the checkpoint, {value} here ({engine.record_reason})")
    applied, refused = classify_changes(meta.get("config") or {}, cfg)
    # (shapes and the text form are named above, with more to say)
    said = tuple(f"model.{k}:" for k in SHAPE_KEYS) + ("data.text_form:",)
    problems += [line for line in refused if not line.startswith(said)]
    if problems:
        raise ConfigError(f"cannot resume from {tag_dir}: " + "; ".join(problems) + "; nothing was changed")
    return applied


class CheckpointManager:
    """Save, find, verify and load checkpoints. ``collectives``: barrier / broadcast_object
    / all_gather_object (albef_ds.distributed by default; tests hand in fakes). ``log``:
    where the lines about skipped checkpoints and conversions go (rank 0's print)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int,
                 collectives=dist_lib, log=print):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.comm = collectives
        self.log = log if rank == 0 else (lambda *a, **k: None)

    # ------------------------------------------------------------------ save
    def save(self, backend, step: int, client_state: dict, files: dict, meta: Optional[dict] = None) -> Path:
        """The engine's state (DeepSpeed's files, or FSDP2's DCP shards) plus ``files`` (file
        name -> object, what THIS rank writes) into ``<tag>.partial``; every file checksummed
        and fsynced, the commit record written, and the folder renamed to ``<tag>`` by rank 0
        when every rank is done. A failed write on any rank raises the same CheckpointError on
        every rank (the partial folder removed, the previous checkpoints untouched)."""
        tag = tag_of(step)
        final, partial = self.dir / tag, self.dir / (tag + PARTIAL)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save killed at this step
        self.comm.barrier()
        try:
            backend.save_checkpoint(self.dir, partial.name, client_state)
        except (OSError, RuntimeError) as e:
            # DeepSpeed's save ends in a barrier of its own, where the other ranks may wait:
            # this rank stops alone, and the job's abort (albef_ds.train.watchdog) ends them.
            line = save_error(e, partial)
            shutil.rmtree(partial, ignore_errors=True)  # frees the space a full disk needs
            raise CheckpointError(f"checkpoint {tag} not saved: rank {self.rank}: {line}; the previous "
                                  f"checkpoints are untouched") from e
        error = None
        try:
            for name, obj in files.items():
                torch.save(obj, partial / name)
        except (OSError, RuntimeError) as e:
            error = f"rank {self.rank}: " + save_error(e, partial)
        self._raise_if_any(error, partial)  # every rank's files are on disk, or every rank stops
        names = self.comm.broadcast_object(
            sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file())
            if self.rank == 0 else None)
        record, error = {}, None
        try:  # this rank's share of the files: checksummed and flushed to stable storage
            for name in share(names, self.rank, self.world_size):
                path = partial / name
                record[name] = [path.stat().st_size, file_crc(path)]
                fsync_path(path)
        except OSError as e:
            error = f"rank {self.rank}: " + save_error(e, partial)
        self._raise_if_any(error, partial)
        shares = self.comm.all_gather_object(record)
        if self.rank == 0:
            files_record = {name: entry for share in shares for name, entry in share.items()}
            commit = {"format": RECORD_FORMAT, "checkpoint_id": uuid.uuid4().hex, "step": step,
                      "world_size": self.world_size, **(meta or {}), "files": files_record}
            atomic_write(partial / META, json.dumps(commit), durable=True)
            fsync_path(partial)
            if final.exists():  # the same step saved twice (a best checkpoint, then the periodic one)
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_path(self.dir)
            self._prune(just_written=tag)
            # after the pruning, and naming the checkpoint just committed: 'latest' always
            # names a complete checkpoint that exists
            atomic_write(self.dir / "latest", tag, durable=True)
        self.comm.barrier()
        return final

    def _raise_if_any(self, error: Optional[str], partial: Path) -> None:
        errors = [e for e in self.comm.all_gather_object(error) if e]
        if errors:
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)  # frees the space a full disk needs
            raise CheckpointError(f"checkpoint {partial.name.removesuffix(PARTIAL)} not saved: {errors[0]}; "
                                  f"the previous checkpoints are untouched")

    def best_tag(self) -> Optional[str]:
        """The tag ``best.json`` names (None without one); a damaged file is an error naming it."""
        best = self.dir.parent / "best.json"
        if not best.is_file():
            return None
        try:
            return json.loads(best.read_text())["tag"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{best}: unreadable ({e}): delete it, or restore the tag of the best "
                                  f"checkpoint in it") from None

    def _prune(self, just_written: str) -> None:
        """Keep the checkpoint just written, the best one, and the newest ``keep_last`` - 1
        others before it; remove partial folders of interrupted saves (this save's own was
        renamed already) and conversions for another world size (the run now has a
        checkpoint of its own world: they would only go stale).

        Checkpoints at higher steps than the one just written are removed whatever
        ``keep_last`` says: they are not this run's past (another run's, or the future of a
        run resumed from an earlier checkpoint, whose metrics were rewound likewise), and
        left there they would sort as newer: rotation would delete the new checkpoints and
        ``--resume auto`` or ``export`` would pick the old one."""
        keep = {just_written}
        best = self.best_tag()
        if best:
            keep.add(best)
        others = [t for t in self.complete_tags() if t not in keep]
        ahead = [t for t in others if t > just_written]
        before = [t for t in others if t < just_written]
        room = max(0, self.keep_last - 1)  # the just-written one counts as the newest kept
        for tag in ahead + before[: max(0, len(before) - room)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        for stale in list(self.dir.glob(f"step_*{PARTIAL}")) + list(self.dir.glob("step_*_universal")):
            shutil.rmtree(stale, ignore_errors=True)  # (<tag>_universal: where older versions converted)
        shutil.rmtree(self.dir / UNIVERSAL_DIR, ignore_errors=True)

    # ------------------------------------------------------------------ find and verify
    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.dir.glob(f"step_*/{META}")
                      if TAG_PATTERN.fullmatch(p.parent.name))

    def _candidates(self, resume: str) -> list[str]:
        """Rank 0: the checkpoints to try, best first."""
        if resume != "auto":
            path = Path(resume)
            if not (path / META).is_file():
                raise CheckpointError(f"{path} is not a complete albef-ds checkpoint (no {META} in it)")
            return [str(path)]
        return [str(self.dir / t) for t in reversed(self.complete_tags())]

    def resolve(self, resume: str) -> Optional[Path]:
        """'none' -> None; 'auto' -> the newest checkpoint that passes verification (None when
        the run has none); a path -> that checkpoint if it passes. Rank 0 lists the
        candidates; every rank must see the one chosen and checksums its share of it."""
        return self.resolve_with_record(resume)[0]

    def resolve_with_record(self, resume: str) -> tuple[Optional[Path], Optional[dict]]:
        """:meth:`resolve`, and the chosen checkpoint's commit record."""
        if resume == "none":
            return None, None
        error = candidates = None
        if self.rank == 0:
            try:
                candidates = self._candidates(resume)
            except CheckpointError as e:
                error = str(e)
        error, candidates = self.comm.broadcast_object((error, candidates))
        if error:
            raise CheckpointError(error)
        skipped = []
        for candidate in candidates:
            path = Path(candidate)
            reason, record = self._verify(path)
            if reason is None:
                for tag, why in skipped:
                    self.log(f"WARNING: checkpoint {tag} skipped: {why}")
                if skipped:
                    self.log(f"note: resuming from {path.name}, the newest intact checkpoint")
                return path, record
            if resume != "auto":
                raise CheckpointError(f"checkpoint {path}: {reason}; nothing was loaded or changed")
            skipped.append((path.name, reason))
        if skipped:
            raise CheckpointError(f"no intact checkpoint in {self.dir} (" + "; ".join(f"{tag}: {why}" for tag, why in skipped)
                                  + "); nothing was loaded or changed (--resume none --overwrite starts afresh)")
        return None, None

    def _verify(self, path: Path) -> tuple[Optional[str], Optional[dict]]:
        """(None, record) when ``path`` is intact on every rank; else (the reason, None),
        the same on every rank. Raises when ranks see different checkpoints there."""
        reason = record = None
        if self.rank == 0:
            reason, record = _check_record(path)
        reason, record = self.comm.broadcast_object((reason, record))
        if reason:
            return reason, None
        # Every rank must see this very checkpoint (a caching shared file system can show a
        # rank another folder, or none) before any rank trusts a checksum.
        seen = _checkpoint_id(path)
        views = self.comm.all_gather_object(seen)
        if any(v != record["checkpoint_id"] for v in views):
            blind = [r for r, v in enumerate(views) if v != record["checkpoint_id"]]
            raise CheckpointError(
                f"ranks disagree about checkpoint {path}: rank 0 sees step {record['step']} (id "
                f"{record['checkpoint_id'][:8]}), rank(s) {blind} see {[views[r] for r in blind]} (None: no readable "
                f"{META}); a shared file system that caches directory listings? nothing was loaded")
        mine = None
        for name in share(sorted(record["files"]), self.rank, self.world_size):
            try:
                if file_crc(path / name) != record["files"][name][1]:
                    mine = f"{path / name}: damaged (CRC-32 differs from the commit record's)"
            except OSError as e:
                mine = f"{path / name}: unreadable ({e.strerror or e})"
            if mine:
                break
        reasons = [r for r in self.comm.all_gather_object(mine) if r]
        return (reasons[0], None) if reasons else (None, record)

    @staticmethod
    def meta(tag_dir: Path) -> dict:
        return json.loads((tag_dir / META).read_text())

    # ------------------------------------------------------------------ load
    def prepare_universal(self, tag_dir: Path, record: dict) -> Path:
        """What this world size loads of ``tag_dir``, written by another: ``tag_dir`` itself
        where the engine that wrote it loads on any world size (its ``convert_for_world`` is
        None); otherwise its conversion (DeepSpeed's ds_to_universal: a universal checkpoint)
        in this run's ``checkpoints/universal/<tag>``: reused only when it was made
        from this very checkpoint (its ``checkpoint_id``) and completed; otherwise rebuilt in
        a temporary folder and renamed. Rank 0 converts; an error reaches every rank."""
        from .engines import engine_class
        convert = engine_class(record.get("engine", "deepspeed")).convert_for_world
        if convert is None:
            return tag_dir
        root = self.dir / UNIVERSAL_DIR
        out = root / tag_dir.name
        error = None
        if self.rank == 0:
            try:
                made_from = _universal_source(out)
                if made_from == record["checkpoint_id"]:
                    self.log(f"using the universal conversion {out} of {tag_dir}")
                else:
                    why = ("none yet" if not out.exists() else "incomplete" if made_from is None else
                           f"stale: made from checkpoint id {made_from[:8]}, not {record['checkpoint_id'][:8]}")
                    self.log(f"converting {tag_dir} (world {record['world_size']}) to a universal checkpoint "
                             f"in {out} ({why})")
                    root.mkdir(parents=True, exist_ok=True)
                    for leftover in root.glob(".*.tmp*"):  # interrupted conversions
                        shutil.rmtree(leftover, ignore_errors=True)
                    tmp = root / f".{tag_dir.name}.tmp{os.getpid()}"
                    convert(tag_dir, tmp)
                    atomic_write(tmp / UNIVERSAL_SOURCE, json.dumps(
                        {"checkpoint_id": record["checkpoint_id"], "source": str(tag_dir)}), durable=True)
                    shutil.rmtree(out, ignore_errors=True)
                    os.replace(tmp, out)
                    fsync_path(root)
            except Exception as e:  # the conversion's own errors: every rank must learn of them
                error = f"converting {tag_dir} to a universal checkpoint failed: {' '.join(str(e).split())[-600:]}"
        error = self.comm.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        if _universal_source(out) != record["checkpoint_id"]:
            raise CheckpointError(f"rank {self.rank} does not see the finished conversion {out} (a shared file "
                                  f"system that caches directory listings?); nothing was loaded")
        return out

    def load(self, backend, tag_dir: Path, ds_dir: Optional[Path] = None) -> dict:
        """Load the engine's state (from ``ds_dir``, default ``tag_dir``); return the client state."""
        ds_dir = ds_dir or tag_dir
        who = f"the {getattr(backend, 'name', '')} engine"
        try:
            client_state = backend.load_checkpoint(ds_dir)
        except Exception as e:
            raise CheckpointError(f"{who} could not load {ds_dir}: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]}") from e
        if client_state is None:
            raise CheckpointError(f"{who} could not load the checkpoint {ds_dir}")
        return client_state


_OWNER = re.compile(r"rank_?(\d+)")


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files of a checkpoint that ``rank`` checksums: a rank's own files (DeepSpeed's
    ``zero_pp_rank_N_...``, ours ``albef_rankN``; ``mp_rank_00_...`` is rank 0's) to that
    rank, the shared ones and those of ranks beyond the world round-robin: what a rank
    reads stays what it writes, and does not grow with the world size."""
    out = []
    for i, name in enumerate(names):
        found = _OWNER.search(name)
        owner = int(found.group(1)) if found and int(found.group(1)) < world_size else i % world_size
        if owner == rank:
            out.append(name)
    return out


def _checkpoint_id(path: Path) -> Optional[str]:
    try:
        return json.loads((path / META).read_text()).get("checkpoint_id")
    except (OSError, ValueError, AttributeError):
        return None


def _check_record(path: Path) -> tuple[Optional[str], Optional[dict]]:
    """(None, record) when ``path``'s commit record is readable and every file it lists is
    there at its size; else (one line naming the file and the reason, None)."""
    meta = path / META
    try:
        record = json.loads(meta.read_text())
    except FileNotFoundError:
        return f"{meta}: missing", None
    except (OSError, ValueError) as e:
        return f"{meta}: unreadable ({' '.join(str(e).split())[:200]})", None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or "checkpoint_id" not in record:
        return (f"{meta}: no file record (written by an albef-ds before checkpoints were verified): its files "
                f"cannot be checked"), None
    for name, (size, _) in sorted(record["files"].items()):
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{path / name}: missing", None
        if actual != size:
            return f"{path / name}: {actual} bytes, the commit record says {size} (truncated or damaged)", None
    return None, record


def _universal_source(out: Path) -> Optional[str]:
    """The checkpoint id a finished conversion was made from (None: none, or unfinished)."""
    try:
        return json.loads((out / UNIVERSAL_SOURCE).read_text()).get("checkpoint_id")
    except (OSError, ValueError, AttributeError):
        return None


def rank_files(tag_dir: Path) -> Iterator[dict]:
    """Every rank's file of a checkpoint (ranks 0 .. world - 1 of its record), loaded one at
    a time (universal resume, export); a missing one is an error naming it."""
    world = int(CheckpointManager.meta(tag_dir)["world_size"])
    for rank in range(world):
        yield read(tag_dir / rank_file_name(rank))


def momentum_partitions(tag_dir: Path) -> Iterator[dict]:
    """Each rank's ZeRO-3 partitions of the momentum master, in rank order, one file at a time."""
    for rank_state in rank_files(tag_dir):
        yield rank_state["ema_partitions"]


def read_queue(tag_dir: Path, pool: int) -> dict:
    """Pool ``pool``'s queues; after a world-size change with more pools than were saved,
    pool p starts from saved pool p mod (saved pools)."""
    saved = max(1, int(CheckpointManager.meta(tag_dir).get("pools", 1)))
    return read(tag_dir / queue_file_name(pool % saved))
