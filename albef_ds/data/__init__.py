"""The reading side: streaming MDS shards -> augmented, tokenised, fixed-shape batches.

Public API::

    build_train_loader(cfg, tokenizer, rank, world_size, epoch_seed=None) -> StreamingDataLoader
    make_train_transform(cfg) -> TrainTransform        # transform(img, rng) -> (tensor, flipped)
    make_eval_transform(res) -> Callable[[PIL.Image], Tensor]
    clean_caption(text, max_words) -> str
    encode_texts(tokenizer, texts, max_tokens, text_form) -> (ids, mask)   # every text the model reads
    loader_state_dict(loader) -> dict; load_loader_state(loader, state) -> None
    save_loader_state(loader, path) -> dict; read_loader_state(path) -> dict
"""
from albef_ds.data.text import clean_caption, encode_texts, swap_left_right
from albef_ds.data.transforms import (CLIP_MEAN, CLIP_STD, TrainTransform, make_eval_transform,
                                      make_train_transform)

__all__ = ["build_train_loader", "make_train_transform", "make_eval_transform", "clean_caption",
           "encode_texts", "swap_left_right", "loader_state_dict", "load_loader_state", "save_loader_state",
           "read_loader_state", "CLIP_MEAN", "CLIP_STD", "TrainTransform", "Collate", "PairDataset"]

_LAZY = {"build_train_loader": "loader", "loader_state_dict": "loader", "load_loader_state": "loader",
         "save_loader_state": "loader", "read_loader_state": "loader", "Collate": "collate",
         "PairDataset": "dataset"}


def __getattr__(name):  # streaming is imported only when the loader is needed
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"albef_ds.data.{_LAZY[name]}"), name)
    raise AttributeError(name)
