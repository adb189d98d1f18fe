"""Reading a retrieval split from disk: ALBEF's annotation JSON and its images."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError


def split_path(value: str) -> Path:
    """A retrieval JSON, or a directory holding val.json / test.json."""
    p = Path(value)
    if p.is_dir():
        for name in ("val.json", "test.json"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no val.json or test.json in this directory")
    if not p.is_file():
        raise FileNotFoundError(f"retrieval split not found: {p}")
    return p


def _read_entries(path: Path, what: str):
    """The parsed JSON of an eval file (``what`` names it in the not-found error)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def read_split(path: Path, max_words: int, max_images=None):
    from ..data import clean_caption
    from .retrieval import split_from_entries
    entries = _read_entries(path, "retrieval split")
    if max_images:
        entries = entries[:max_images]
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise ConfigError(f"{path}: entry {i} lacks 'image' or 'caption' (ALBEF's layout: "
                              f"[{{\"image\": path, \"caption\": [...]}}, ...])")
    return split_from_entries(entries, lambda c: clean_caption(c, max_words))


def read_compositional(path: Path, max_words: int, max_images=None):
    """The compositional test (``albef-data synth``'s compositional.json) as a
    :class:`~albef_ds.eval.compositional.CompositionalSet`, captions cleaned as retrieval's."""
    from ..data import clean_caption
    from .compositional import set_from_entries
    entries = _read_entries(path, "compositional test")
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a list of entries, got a {type(entries).__name__}")
    if max_images:
        entries = entries[:max_images]
    return set_from_entries(entries, lambda c: clean_caption(c, max_words), where=str(path))


def make_io(cfg, split, image_root: Path, tokenizer):
    """(load_images(indices) -> tensor, tokenize(texts) -> (ids, mask)) for evaluate()."""
    from PIL import Image

    from ..data import encode_texts, make_eval_transform
    transform = make_eval_transform(cfg.model.image_res)

    def load_images(indices):
        return torch.stack([transform(Image.open(image_root / split.images[i]).convert("RGB")) for i in indices])

    def tokenize(texts):
        return encode_texts(tokenizer, texts, cfg.data.max_tokens, cfg.data.text_form)

    return load_images, tokenize
