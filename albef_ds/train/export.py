"""One fp32 model from a (ZeRO-sharded) training checkpoint.

Online weights come from the engine that wrote the checkpoint (its consolidated fp32 state:
DeepSpeed's fp32 optimizer partitions through ``zero_to_fp32``), the
momentum weights from our fp32 EMA master (the shared file, ZeRO-3 partitions joined from
the rank files one at a time), the queues from pool 0's queue file. Writes ``model.pt`` (our layout, loadable by
:func:`load_exported`), ``albef.pth`` (the reference release's layout), ``config.yaml`` and a
copy of the tokenizer folder (``tokenizer/``, which the config names by its absolute path).

Text form (``data.text_form``): ``model.pt`` and ``albef.pth`` hold it beside the weights,
``config.yaml`` names it, a checkpoint's meta records it. Whatever records none was written
before the setting existed and was trained on the legacy form (``cls_sep``); a weights file
with no record and no config.yaml beside it is taken for the reference release's
(``cls_only``). Fine-tuning, evaluation and resume refuse the other form
(:func:`check_text_form`).

Exports go to ``RUN/exports/step_N/`` by default: outside ``checkpoints/``, so checkpoint
rotation (``checkpoint.keep_last``) never deletes them.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from ..config import Config, load_config
from ..errors import UsageError
from .checkpoint import META, CheckpointManager


def resolve_checkpoint(path: str, label: str = "") -> Path:
    """A run directory (its newest intact checkpoint) or a checkpoint folder -> that folder.
    ``label``: how the caller's user named the path (e.g. "--init"), to begin each error."""
    p = Path(path)
    named = f"{label} {p}" if label else str(p)
    if not p.exists():
        raise UsageError(f"{named}: not found")
    if (p / "checkpoints").is_dir():
        found = CheckpointManager(p, 1, 0, 1).resolve("auto")
        if found is None:
            raise UsageError(f"{named}: a run directory without a complete checkpoint (nothing committed under "
                             f"{p / 'checkpoints'}; an unfinished run saves every checkpoint.every_steps)")
        return found
    if not (p / META).is_file():
        raise UsageError(f"{named}: not a run directory, a checkpoint or an export (none of checkpoints/, {META}, "
                         f"model.pt in it)")
    CheckpointManager(p.parent.parent, 1, 0, 1).resolve(str(p))  # raises if damaged
    return p


def consolidate(tag_dir: Path, cfg: Config) -> torch.nn.Module:
    """An ALBEF (fp32, CPU) holding the checkpoint's weights, momentum masters and queues."""
    from ..objectives import build_task_model
    from . import checkpoint as ckpt_lib
    from .ema import assemble_full
    from .engines import engine_class

    model = build_task_model(cfg)
    # (a record without the key, or no record: written by DeepSpeed, before the key existed)
    record = CheckpointManager.meta(tag_dir) if (tag_dir / META).is_file() else {}
    engine = engine_class(record.get("engine", "deepspeed"))
    state = engine.consolidated_fp32_state(tag_dir)
    momentum = ckpt_lib.read(tag_dir / ckpt_lib.MOMENTUM_FILE)
    state.update(assemble_full(momentum, ckpt_lib.momentum_partitions(tag_dir)))
    state.update(ckpt_lib.read_queue(tag_dir, 0))  # pool 0's queues
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied (decoder = word embeddings) and buffer entries may be absent from DeepSpeed's
    # parameter list; anything else missing is a real gap.
    real_missing = [k for k in missing if not k.endswith(("position_ids", "decoder.weight", "decoder.bias"))]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint {tag_dir} does not fit the config's model: "
                           f"missing {real_missing[:10]}, unexpected {unexpected[:10]}")
    return model


#: where an export keeps its copy of the tokenizer folder
EXPORT_TOKENIZER = "tokenizer"


def default_export_dir(tag_dir: Path) -> Path:
    """``RUN/exports/<tag>``: beside the checkpoints, out of rotation's reach."""
    return tag_dir.parent.parent / "exports" / tag_dir.name


def save_exported(model, cfg: Config, out: Path, reference_pth: bool = False) -> Path:
    """``model.pt``, ``config.yaml`` and the tokenizer (copied into ``out/tokenizer``, the
    config pointing at it by absolute path) into ``out``; ``reference_pth``: also
    ``albef.pth`` in the reference layout of the config's objective. Returns ``out``."""
    from ..config import save_config
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    copied = out / EXPORT_TOKENIZER
    if tokenizer is not None and tokenizer.is_dir() and tokenizer.resolve() != copied.resolve():
        shutil.rmtree(copied, ignore_errors=True)
        shutil.copytree(tokenizer, copied)
    if copied.is_dir():
        cfg.data.tokenizer = str(copied)
    from ..weights import TEXT_FORM_KEY
    tmp = out / "model.pt.tmp"
    torch.save({"model": model.state_dict(), TEXT_FORM_KEY: cfg.data.text_form}, tmp)
    tmp.replace(out / "model.pt")
    save_config(cfg, out / "config.yaml")
    if reference_pth:
        from ..objectives import reference_layout
        from ..weights import save_albef_pth
        save_albef_pth(model, out / "albef.pth", text_form=cfg.data.text_form, **reference_layout(cfg))
    return out


def export_checkpoint(tag_dir: Path, cfg: Config, out: Path | None = None) -> Path:
    """Consolidate ``tag_dir`` and save it (model.pt, albef.pth, config, tokenizer) into
    ``out`` (default ``RUN/exports/<tag>``), with the text form the checkpoint records."""
    cfg = copy.deepcopy(cfg)
    cfg.data.text_form = checkpoint_text_form(tag_dir)
    return save_exported(consolidate(tag_dir, cfg), cfg, out or default_export_dir(tag_dir), reference_pth=True)


# ------------------------------------------------------------------ text form records

def checkpoint_text_form(tag_dir: Path) -> str:
    """The text form a checkpoint's meta records (the legacy form when it records none)."""
    from ..data.text import LEGACY_TEXT_FORM
    return CheckpointManager.meta(Path(tag_dir)).get("text_form", LEGACY_TEXT_FORM)


def saved_text_form(config_yaml: Path) -> str:
    """``data.text_form`` as a saved config.yaml (a run's, an export's) names it; the legacy
    form when it names none (saved before the setting existed)."""
    import yaml

    from ..data.text import LEGACY_TEXT_FORM
    saved = yaml.safe_load(Path(config_yaml).read_text()) or {}
    return (saved.get("data") or {}).get("text_form", LEGACY_TEXT_FORM)


def load_saved_config(config_yaml: Path, overrides: list[str] | None = None) -> Config:
    """A run's or export's own config.yaml with ``overrides``; its text form as saved (the
    legacy form when it names none), unless an override sets one."""
    cfg = load_config(config_yaml, overrides)
    if not any(o.split("=", 1)[0].strip() == "data.text_form" for o in overrides or []):
        cfg.data.text_form = saved_text_form(config_yaml)
    return cfg


def recorded_text_form(weights: str | Path, in_file: str | None) -> tuple[str, str]:
    """(the text form ``weights`` was trained on, how we know) from the file's own record
    (``in_file``: its ``text_form`` entry, :func:`albef_ds.weights.read_checkpoint`), else the
    config.yaml beside it (an export's), else the reference release's."""
    from ..data.text import REFERENCE_TEXT_FORM
    beside = Path(weights).parent / "config.yaml"
    if in_file:
        return in_file, str(weights)
    if beside.is_file():
        return saved_text_form(beside), f"{weights} (by {beside})"
    return REFERENCE_TEXT_FORM, f"{weights} (no text form recorded: taken for a reference release)"


def check_text_form(recorded: str, what: str, cfg: Config) -> None:
    """ConfigError, one line naming both forms, when ``what`` was trained on another text
    form than ``cfg.data.text_form``."""
    from ..config import ConfigError
    from ..data.text import text_form_problem
    problem = text_form_problem(recorded, cfg.data.text_form, what)
    if problem:
        raise ConfigError(problem)


def load_exported(directory: str | Path):
    """(model, cfg) from an export directory, the config's text form the one the export
    records. A tokenizer path that no longer exists (the export was moved or copied to
    another machine) falls back to the export's own copy."""
    directory = Path(directory)
    cfg = load_saved_config(directory / "config.yaml")
    own = directory / EXPORT_TOKENIZER
    if own.is_dir() and not (cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir()):
        cfg.data.tokenizer = str(own.absolute())
    from ..objectives import build_task_model
    from ..weights import TEXT_FORM_KEY
    model = build_task_model(cfg)
    saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    cfg.data.text_form = saved.get(TEXT_FORM_KEY, cfg.data.text_form)
    return model, cfg


def resolve_init(path: str, label: str = "") -> str:
    """The weights ``checkpoint.init_from`` names for ``path`` (``--init``, ``--model``): a
    file or an export's model.pt as they are; for a run or checkpoint directory, the export
    ``albef-ds export`` made of that checkpoint (``RUN/exports/<tag>``) when there is one,
    else the checkpoint folder itself, which :func:`read_init` consolidates in memory.
    Writes nothing: a run used as a source (fine-tuning, evaluation) is only read, whoever
    owns it and whatever else reads it at the same time."""
    p = Path(path)
    if p.is_file() or (p / "model.pt").is_file():
        return str(p / "model.pt") if p.is_dir() else str(p)
    tag_dir = resolve_checkpoint(path, label)
    made = default_export_dir(tag_dir) / "model.pt"
    return str(made) if made.is_file() else str(tag_dir)


def read_init(path: str) -> tuple[dict, str, dict]:
    """:func:`albef_ds.weights.read_checkpoint` for ``checkpoint.init_from``, which may also
    name a training checkpoint folder (:func:`resolve_init`): consolidated here, on each
    rank that asks, with its run's config.yaml, into the state an export of it would hold
    (the record: the text form its meta names)."""
    from ..weights import TEXT_FORM_KEY, read_checkpoint
    tag_dir = Path(path)
    if not (tag_dir.is_dir() and (tag_dir / META).is_file()):
        return read_checkpoint(path)
    cfg = load_config(tag_dir.parent.parent / "config.yaml")
    cfg.data.text_form = checkpoint_text_form(tag_dir)
    return consolidate(tag_dir, cfg).state_dict(), str(tag_dir), {TEXT_FORM_KEY: cfg.data.text_form}


def init_tokenizer(path: str) -> str | None:
    """The tokenizer folder the weights named by ``--init`` were trained with, when they are
    ours and it is still there: an export's own copy, else the run's config.yaml's. None for
    a reference .pth (it ships none) or a folder that no longer exists."""
    p = Path(path)
    export = p.parent if p.is_file() and p.name == "model.pt" else p
    if (export / EXPORT_TOKENIZER).is_dir() and (export / "model.pt").is_file():
        return str((export / EXPORT_TOKENIZER).absolute())
    for config_yaml in (export / "config.yaml", export.parent.parent / "config.yaml"):
        if config_yaml.is_file():
            named = load_config(config_yaml).data.tokenizer
            return named if named and Path(named).is_dir() else None
    return None
