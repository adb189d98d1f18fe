"""Foreign weights in, reference layout out.

Three sources load into :class:`~albef_ds.models.ALBEF`, each returning a
:class:`LoadReport` that says what was loaded, resampled, left fresh or dropped:

- :func:`load_hf_bert`: a Hugging Face BERT folder (``config.json`` plus
  ``model.safetensors`` or ``pytorch_model.bin``), as ALBEF initialises its text encoder
  from ``bert-base-uncased``. The fusion layers' cross-attention has no counterpart there
  and keeps its fresh initialisation.
- :func:`load_vit_state_dict`: a DeiT/timm ViT state dict at any resolution (the position
  embedding is resampled bicubically, CLS kept), as ALBEF initialises from DeiT-base 224 px.
- :func:`load_albef_checkpoint`: the reference release (``ALBEF.pth``, pretraining layout),
  its fine-tuned retrieval layout, or an export of ours.

:func:`export_albef_state_dict` / :func:`save_albef_pth` write the reference layout back,
key for key (``tests/fixtures/albef_pretrain_keys.txt``).

Module names of our model equal the reference's (see albef_ds/models/albef.py), so the
mapping is small: the release's ``temp`` is a 0-d scalar (ours has shape [1], because
DeepSpeed cannot broadcast 0-d tensors), and the retrieval layout's text encoder is a plain
``BertModel`` (``text_encoder.encoder.…``, no ``.bert``, no MLM head).

Queue size differences (decision): a checkpoint whose feature queues hold a different
number of entries than ``model.queue_size`` is not an error. The newest
``min(ours, theirs)`` entries are kept in the order they were written and placed at the end
of our queue, the pointer set to 0, so the next writes overwrite the oldest (or the random
initial) entries first: the queue stays a FIFO. The load warns and the report notes it.
A different feature width (``embed_dim``) is a shape error like any other.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .errors import UsageError
from .models import vit as vit_lib

StateDict = dict[str, torch.Tensor]
PathOrStateDict = Union[str, os.PathLike, Mapping]

#: Reference layout: momentum copies of these online parts carry the ``_m`` suffix.
_ONLINE_PARTS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")
#: Queue-like buffers [D, Q] whose length may differ between checkpoint and model.
_QUEUES = ("image_queue", "text_queue", "idx_queue")
#: Buffers that exist only in some layouts/configurations (retrieval fine-tuning).
_OPTIONAL = ("idx_queue",)
#: How many names an error message lists before summarising the rest.
_MAX_NAMES = 40


class WeightLoadError(UsageError, ValueError):
    """Weights that do not fit the model; the message names the offending keys."""


@dataclass
class LoadReport:
    """What a load did. Every list holds model-side key names unless said otherwise."""

    source: str = ""
    #: model keys that received a tensor from the source.
    loaded: list = field(default_factory=list)
    #: model keys the source should have provided but did not (an error when strict).
    missing: list = field(default_factory=list)
    #: source keys with no place in the model (an error when strict).
    unexpected: list = field(default_factory=list)
    #: "key: old shape -> new shape" for position embeddings resampled to our resolution.
    resampled: list = field(default_factory=list)
    #: model keys the source has no counterpart for by design, left at their fresh
    #: initialisation (cross-attention for a plain BERT, the MLM head of a retrieval model).
    freshly_initialised: list = field(default_factory=list)
    #: source keys dropped by design (BERT pooler/NSP head, ViT classifier, ...), "key (why)".
    ignored: list = field(default_factory=list)
    #: anything else worth knowing (queue resized, momentum copied, ...).
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source or '<state dict>'}"]
        for title, items in (("resampled", self.resampled),
                             ("freshly initialised (no counterpart in the source)", self.freshly_initialised),
                             ("missing from the source", self.missing),
                             ("unexpected in the source", self.unexpected),
                             ("ignored", self.ignored)):
            if items:
                lines.append(f"  {title} ({len(items)} tensors): {_names(_compress(items))}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _names(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_NAMES])
    return shown + (f", ... and {len(items) - _MAX_NAMES} more" if len(items) > _MAX_NAMES else "")


def _compress(keys: list) -> list:
    """Fold per-layer names into one pattern ('…layer.{6-11}.crossattention.self.key.weight')
    so that a report stays readable; names without a layer index are kept as they are."""
    groups: dict = {}
    for k in keys:
        m = re.match(r"^(.*\.(?:layer|blocks)\.)(\d+)(\..*)$", str(k))
        if m:
            groups.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
        else:
            groups.setdefault((str(k), None), [])
    out = []
    for (head, tail), idx in groups.items():
        if tail is None:
            out.append(head)
        elif len(idx) == 1:
            out.append(f"{head}{idx[0]}{tail}")
        else:
            out.append(f"{head}{{{min(idx)}-{max(idx)}}}{tail}")
    return out


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


# ------------------------------------------------------------------------------ reading

def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # old checkpoints pickle non-tensor objects (argparse, numpy)
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise
        warnings.warn(f"{path}: not loadable with weights_only=True ({type(e).__name__}); "
                      "loading the full pickle: only do this for files you trust")
        return torch.load(path, map_location="cpu", weights_only=False)


def _read(path_or_state_dict: PathOrStateDict) -> tuple[StateDict, str]:
    """A state dict (unwrapped from {'model': …}, {'state_dict': …} or {'module': …}, a
    'module.' prefix stripped) and a name for reports."""
    sd, source, _ = _read_with_record(path_or_state_dict)
    return sd, source


def _read_with_record(path_or_state_dict: PathOrStateDict) -> tuple[StateDict, str, dict]:
    """:func:`_read`, and the plain values (str, number, bool) beside the wrapped state dict."""
    if isinstance(path_or_state_dict, Mapping):
        obj, source = path_or_state_dict, "<state dict>"
    else:
        source = str(path_or_state_dict)
        obj = _torch_load(Path(path_or_state_dict))
    record = {}
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            record = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool))}
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{source}: expected a state dict, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, source, record


def _alias_map(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """state-dict key -> canonical key (the first name of a tied tensor); so that, e.g., the
    MLM decoder weight counts as provided when the word embeddings are."""
    canonical: dict[int, str] = {}
    out = {}
    named = list(module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False))
    named += list(module.named_buffers(prefix=prefix.rstrip("."), remove_duplicate=False))
    for name, tensor in named:
        out[name] = canonical.setdefault(id(tensor), name)
    return out


def _check_shapes(sd: StateDict, expected: Mapping[str, torch.Tensor], source: str,
                  source_names: Mapping[str, str] | None = None) -> None:
    bad = []
    for key, value in sd.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            name = source_names.get(key, key) if source_names else key
            where = f"{key} (source key {name})" if name != key else key
            bad.append(f"{where}: source {_shape(value)} vs model {_shape(expected[key])}")
    if bad:
        raise WeightLoadError(f"{source}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:_MAX_NAMES]))


def _load_into(module: nn.Module, sd: StateDict) -> None:
    """Copy ``sd`` (a subset of ``module``'s keys) in place; shapes already checked."""
    result = module.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def _covered(keys, aliases: Mapping[str, str]) -> set:
    """Canonical names of the model tensors that ``keys`` provide."""
    return {aliases.get(k, k) for k in keys}


def _missing(model_keys, provided: set, aliases: Mapping[str, str]) -> list:
    """Model keys none of whose aliases were provided (each tied group named once)."""
    seen, out = set(), []
    for k in model_keys:
        c = aliases.get(k, k)
        if c not in provided and c not in seen:
            seen.add(c)
            out.append(k)
    return out


def _raise_if(strict: bool, report: LoadReport, what: str, allow_missing: bool = False,
              hint: str = "strict=False loads the rest and reports these") -> None:
    missing = [] if allow_missing else report.missing
    if strict and (missing or report.unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if report.unexpected:
            parts.append(f"unexpected {len(report.unexpected)} key(s): {_names(report.unexpected)}")
        raise WeightLoadError(f"{report.source}: {what} does not match the model: " + "; ".join(parts)
                              + f" ({hint})")


# ------------------------------------------------------------------------ Hugging Face BERT

def _hf_state_dict(folder: Path) -> StateDict:
    single = [folder / "model.safetensors", folder / "pytorch_model.bin"]
    index = [folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"]
    for path in single:
        if path.is_file():
            return _read_weights_file(path)
    for path in index:
        if path.is_file():
            files = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            sd = {}
            for name in files:
                sd.update(_read_weights_file(folder / name))
            return sd
    raise WeightLoadError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _read_weights_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd, _ = _read(path)
    return sd


#: HF config.json fields that no tensor shape reveals but must agree with ours.
def _check_hf_config(hf: dict, cfg, folder: Path) -> None:
    problems = []
    # Widths show in every tensor's shape too, but a shape error lists each of hundreds of
    # tensors: one line naming the setting says it better.
    for hf_key, ours in (("hidden_size", "text_width"), ("intermediate_size", "text_intermediate")):
        value = hf.get(hf_key)
        if value is not None and value != getattr(cfg, ours):
            problems.append(f"{hf_key} {value} vs model.{ours} {getattr(cfg, ours)}")
    depth = hf.get("num_hidden_layers")
    if depth is not None and depth != cfg.text_depth:
        problems.append(f"num_hidden_layers {depth} vs model.text_depth {cfg.text_depth} "
                        f"(layers 0-{cfg.fusion_layer - 1} text, {cfg.fusion_layer}-{cfg.text_depth - 1} fusion)")
    heads = hf.get("num_attention_heads")
    if heads is not None and heads != cfg.text_heads:
        problems.append(f"num_attention_heads {heads} vs model.text_heads {cfg.text_heads}")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        problems.append(f"hidden_act {act!r}: our BERT implements exact (erf) 'gelu' only")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf['position_embedding_type']!r}: only 'absolute' is implemented")
    eps = hf.get("layer_norm_eps")
    if eps is not None and abs(eps - cfg.layer_norm_eps) > 1e-15:
        warnings.warn(f"{folder}: layer_norm_eps {eps} differs from model.layer_norm_eps {cfg.layer_norm_eps}")
    if problems:
        raise WeightLoadError(f"{folder}/config.json does not match the model: " + "; ".join(problems))


def _hf_key(key: str) -> str | None:
    """HF BERT key -> our key under ``text_encoder.`` (None: dropped by design)."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.startswith(("pooler.", "cls.seq_relationship.")):
        return None  # ALBEF has no pooler and no next-sentence head
    if key.startswith("cls.predictions."):
        return key
    if key.startswith(("embeddings.", "encoder.")):
        return "bert." + key
    return "?" + key  # unknown: reported as unexpected


def load_hf_bert(model: nn.Module, folder: str | os.PathLike, momentum_too: bool = True,
                 strict: bool = True) -> LoadReport:
    """Load a Hugging Face BERT folder into ``model.text_encoder`` (and its momentum copy).

    Keys may carry a ``bert.`` prefix (``BertForMaskedLM``/``BertForPreTraining``) or not
    (``BertModel``); the pooler and NSP head are ignored; a ``cls.predictions`` MLM head is
    loaded when present (else it stays fresh, reported). The fusion layers' cross-attention
    has no counterpart in BERT: it keeps its fresh initialisation and is reported. Depth,
    width, vocabulary or head-count mismatches are errors naming the key and both shapes.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    encoder = model.text_encoder
    _check_hf_config(json.loads(cfg_path.read_text()), encoder.bert.cfg, folder)
    raw = _hf_state_dict(folder)

    report = LoadReport(source=str(folder))
    expected = encoder.state_dict()
    aliases = _alias_map(encoder)
    mapped, source_names = {}, {}
    for key, value in raw.items():
        ours = _hf_key(key)
        if ours is None:
            report.ignored.append(f"{key} (no pooler/NSP head in ALBEF)")
        elif ours not in expected:
            report.unexpected.append(key)
        else:
            mapped[ours] = value
            source_names[ours] = key
    _check_shapes(mapped, expected, str(folder), source_names)

    provided = _covered(mapped, aliases)
    for key in _missing(expected, provided, aliases):
        if ".crossattention." in key or key.startswith("cls."):
            report.freshly_initialised.append("text_encoder." + key)
        elif key.endswith("position_ids"):
            pass  # a constant arange buffer; newer HF versions no longer save it
        else:
            report.missing.append("text_encoder." + key)
    _raise_if(strict, report, "the BERT folder")

    _load_into(encoder, mapped)
    report.loaded = ["text_encoder." + k for k in mapped]
    if momentum_too and hasattr(model, "text_encoder_m"):
        # ALBEF starts the momentum model as an exact copy (fresh cross-attention included).
        model.text_encoder_m.load_state_dict(encoder.state_dict())
        report.notes.append("text_encoder_m copied from text_encoder")
    return report


# ---------------------------------------------------------------------------- timm / DeiT ViT

def load_vit_state_dict(model: nn.Module, path_or_state_dict: PathOrStateDict,
                        momentum_too: bool = True, strict: bool = True) -> LoadReport:
    """Load a DeiT/timm ViT state dict (bare, or under 'model'/'state_dict') into
    ``model.visual_encoder`` (and its momentum copy), resampling the position embedding to
    our resolution (bicubic on the patch grid, CLS kept; ``adapt_vit_state_dict``) and
    dropping classifier heads and DeiT's distillation token."""
    sd, source = _read(path_or_state_dict)
    for prefix in ("visual_encoder.", "encoder.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    vit = model.visual_encoder
    report = LoadReport(source=source)
    adapted = vit_lib.adapt_vit_state_dict(sd, vit)
    for key in sd:
        if key not in adapted:
            report.ignored.append(f"{key} (classifier/distillation, not used by ALBEF)")
    if "pos_embed" in sd and "pos_embed" in adapted and sd["pos_embed"].shape != adapted["pos_embed"].shape:
        report.resampled.append(f"visual_encoder.pos_embed: {_shape(sd['pos_embed'])} -> "
                                f"{_shape(adapted['pos_embed'])} (bicubic, CLS kept)")
    expected = vit.state_dict()
    report.unexpected = [k for k in adapted if k not in expected]
    mapped = {k: v for k, v in adapted.items() if k in expected}
    _check_shapes(mapped, expected, source)
    report.missing = ["visual_encoder." + k for k in expected if k not in mapped]
    _raise_if(strict, report, "the ViT state dict")
    _load_into(vit, mapped)
    report.loaded = ["visual_encoder." + k for k in mapped]
    if momentum_too and hasattr(model, "visual_encoder_m"):
        model.visual_encoder_m.load_state_dict(vit.state_dict())
        report.notes.append("visual_encoder_m copied from visual_encoder")
    return report


# ------------------------------------------------------------------------- ALBEF checkpoints

def _is_retrieval_layout(sd: Mapping) -> bool:
    return any(k.startswith(("text_encoder.encoder.", "text_encoder.embeddings.")) for k in sd)


def _from_retrieval_key(key: str) -> str:
    """text_encoder(_m).{embeddings,encoder}.… -> text_encoder(_m).bert.…"""
    return re.sub(r"^(text_encoder(?:_m)?)\.(embeddings|encoder)\.", r"\1.bert.\2.", key)


def _fit_queue(theirs: torch.Tensor, their_ptr: int, ours: torch.Tensor) -> torch.Tensor:
    """Their queue [D, Q'] in write order (oldest first, from the pointer), newest
    min(Q, Q') entries placed at the end of a copy of ours [D, Q]; pointer becomes 0."""
    q_theirs, q_ours = theirs.shape[1], ours.shape[1]
    if q_theirs == 0:  # nothing to keep (a model trained with model.queue_size 0): ours stays
        return ours.detach().clone().to(theirs.dtype)
    ordered = torch.roll(theirs, shifts=-(their_ptr % q_theirs), dims=1)
    keep = min(q_ours, q_theirs)
    out = ours.detach().clone().to(theirs.dtype)
    out[:, q_ours - keep:] = ordered[:, q_theirs - keep:]
    return out


def read_state_dict(path_or_state_dict: PathOrStateDict) -> tuple[StateDict, str]:
    """(state dict, name for reports) of a checkpoint file (unwrapped as the loaders do)."""
    return _read(path_or_state_dict)


def read_checkpoint(path_or_state_dict: PathOrStateDict) -> tuple[StateDict, str, dict]:
    """:func:`read_state_dict` and the file's record: the plain values stored beside the
    weights (ours: ``text_form``, :data:`TEXT_FORM_KEY`; the reference's: ``epoch``)."""
    return _read_with_record(path_or_state_dict)


#: the entry beside ``model`` in our weight files (model.pt, albef.pth) naming the text form
#: (data.text_form) the weights were trained on
TEXT_FORM_KEY = "text_form"


def load_albef_checkpoint(model: nn.Module, path_or_state_dict: PathOrStateDict,
                          strict: bool = True, optional: tuple = (), ignore: tuple = (),
                          source: str | None = None, allow_missing: bool = False,
                          hint: str | None = None) -> LoadReport:
    """Load a checkpoint of the reference ALBEF release (its 'model' entry, or a bare state
    dict), its fine-tuned retrieval layout, or an export of ours.

    - ``visual_encoder(_m).pos_embed`` is resampled when the resolution differs (bicubic,
      CLS kept), e.g. the 256 px pretraining checkpoint into a 384 px fine-tuning model.
    - Queues of another length are fitted (newest entries kept, pointer 0) with a warning:
      see the module docstring.
    - Retrieval layout (``text_encoder.encoder.…``, no MLM head, ``idx_queue``): mapped
      onto ours; the MLM head keeps its current weights (reported as fresh). ``idx_queue``
      loads when the model has one (``model.itc_id_positives``), else it is ignored.
    - ``optional``: key prefixes the checkpoint may lack (a task's heads when starting
      from a pretraining checkpoint; the parts a task does not use when loading a reference
      task checkpoint such as VE's): they keep their current weights, reported as fresh.
    - ``ignore``: key prefixes of the checkpoint that are dropped (reported as ignored),
      e.g. the text-assignment head of an NLVR2 pre-fine-tuning checkpoint.
    - ``source``: the name reports give the checkpoint (when a state dict is passed).
    - ``strict``: any other missing or unexpected key is an error naming it; with
      ``strict=False`` they are reported. Shape mismatches are always errors.
    - ``allow_missing``: strict about unexpected keys only; the missing ones keep their
      current weights and are reported as missing (``checkpoint.allow_partial``).
    - ``hint``: what the error adds on how to load anyway (default: the ``strict`` flag).
    """
    sd, read_source = _read(path_or_state_dict)
    source = source or read_source
    report = LoadReport(source=source)
    dropped = [k for k in sd if _under(k, ignore)]
    if dropped:
        report.ignored.append(f"{len(dropped)} tensors under {', '.join(ignore)} (not used by this task)")
        sd = {k: v for k, v in sd.items() if k not in dropped}
    retrieval = _is_retrieval_layout(sd)
    if retrieval:
        sd = {_from_retrieval_key(k): v for k, v in sd.items()}
        report.notes.append("retrieval (fine-tuned) layout: text encoder mapped to text_encoder.bert.*")

    expected = model.state_dict()
    aliases = _alias_map(model)
    sd = dict(sd)

    # temp: the release stores a 0-d scalar, ours has shape [1].
    if "temp" in sd and "temp" in expected and sd["temp"].numel() == 1:
        sd["temp"] = sd["temp"].reshape(expected["temp"].shape)

    # Position embeddings at another resolution.
    for part in ("visual_encoder", "visual_encoder_m"):
        key = f"{part}.pos_embed"
        if key in sd and key in expected and sd[key].shape != expected[key].shape:
            if sd[key].shape[-1] != expected[key].shape[-1]:
                raise WeightLoadError(f"{source}: shape mismatch: {key}: source {_shape(sd[key])} "
                                      f"vs model {_shape(expected[key])} (different ViT width)")
            old = _shape(sd[key])
            sd[key] = vit_lib.resample_pos_embed(sd[key], getattr(model, part).patch_embed.num_patches)
            report.resampled.append(f"{key}: {old} -> {_shape(sd[key])} (bicubic, CLS kept)")

    # Queues of another length.
    ptr = int(sd["queue_ptr"].reshape(-1)[0]) if "queue_ptr" in sd else 0
    resized = False
    for name in _QUEUES:
        if name in sd and name in expected:
            theirs, ours = sd[name], expected[name]
            if theirs.dim() == 2 and ours.dim() == 2 and theirs.shape[0] == ours.shape[0] \
                    and theirs.shape[1] != ours.shape[1]:
                sd[name] = _fit_queue(theirs, ptr, ours)
                if theirs.shape[1] == 0:
                    report.notes.append(f"{name}: the source has no queue (model.queue_size 0 there): "
                                        f"ours ({ours.shape[1]} entries) kept as it is")
                else:
                    report.notes.append(f"{name}: {theirs.shape[1]} entries -> {ours.shape[1]} "
                                            f"(newest {min(theirs.shape[1], ours.shape[1])} kept in write order)")
                    resized = True
    if resized:
        if "queue_ptr" in expected:
            sd["queue_ptr"] = torch.zeros_like(expected["queue_ptr"])
        warnings.warn(f"{source}: queue length differs from model.queue_size; "
                      + "; ".join(n for n in report.notes if "entries ->" in n))

    for name in _OPTIONAL:
        if name in sd and name not in expected:
            report.ignored.append(f"{name} (the model has none: model.itc_id_positives is off)")
            del sd[name]

    report.unexpected = [k for k in sd if k not in expected]
    mapped = {k: v for k, v in sd.items() if k in expected}
    _check_shapes(mapped, expected, source)
    provided = _covered(mapped, aliases)
    for key in _missing(expected, provided, aliases):
        if key in _OPTIONAL or _under(key, optional):
            report.freshly_initialised.append(key)
        elif retrieval and re.match(r"^text_encoder(_m)?\.cls\.", key):
            report.freshly_initialised.append(key)  # retrieval checkpoints carry no MLM head
        else:
            report.missing.append(key)
    _raise_if(strict, report, "the checkpoint", allow_missing, *([hint] if hint else []))
    _load_into(model, mapped)
    report.loaded = list(mapped)
    return report


def _under(key: str, prefixes: tuple) -> bool:
    """``key`` is the module ``p`` or lies inside it, for one of the prefixes."""
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def export_albef_state_dict(model: nn.Module, layout: str = "pretrain", keep: tuple = (),
                            text_is_bert_model: bool = False) -> StateDict:
    """Our weights in the reference release's layout.

    ``layout="pretrain"``: exactly the keys and shapes of the reference pretraining model
    (tests/fixtures/albef_pretrain_keys.txt): ``temp`` as a 0-d scalar, tied tensors under
    each of their names, no ``idx_queue``. ``layout="retrieval"``: the fine-tuned retrieval
    model's (text encoder without ``.bert``, no MLM head, ``idx_queue`` when the model has one).
    ``layout="task"``: a downstream task's (an objective's ``reference_layout``): only the
    keys under the ``keep`` prefixes (after renaming), the text encoder without ``.bert``
    and without the MLM head when ``text_is_bert_model``.
    """
    if layout not in ("pretrain", "retrieval", "task"):
        raise ValueError(f"layout must be 'pretrain', 'retrieval' or 'task', got {layout!r}")
    strip_bert = layout == "retrieval" or (layout == "task" and text_is_bert_model)
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if key == "temp":
            value = value.reshape(())
        if layout == "pretrain" and key in _OPTIONAL:
            continue
        if strip_bert:
            if re.match(r"^text_encoder(_m)?\.cls\.", key):
                continue
            key = re.sub(r"^(text_encoder(?:_m)?)\.bert\.", r"\1.", key)
        if layout == "task" and not _under(key, keep):
            continue
        out[key] = value
    return out


def save_albef_pth(model: nn.Module, path: str | os.PathLike, layout: str = "pretrain",
                   text_form: str | None = None, **task_layout) -> None:
    """Write ``{'model': export_albef_state_dict(model, layout, **task_layout)}`` as the
    reference release does (atomically: a temporary file renamed into place), with
    ``text_form`` beside it when given (the reference's loaders read ``['model']`` only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    record = {TEXT_FORM_KEY: text_form} if text_form else {}
    torch.save({"model": export_albef_state_dict(model, layout, **task_layout), **record}, tmp)
    os.replace(tmp, path)
