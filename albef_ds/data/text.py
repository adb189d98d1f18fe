"""Text as ALBEF prepares it: captions cleaned for pretraining, and every single text
turned into the model's token ids (:func:`encode_texts`, in the form ``data.text_form``)."""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

# ALBEF's pretraining caption cleaning: lower case; these punctuation marks removed;
# '-' and '/' become spaces; '<person>' (a CC3M hypernym token) becomes 'person'.
_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def clean_caption(text: str, max_words: int) -> str:
    """Lower-case, strip punctuation, collapse spaces, keep the first ``max_words`` words."""
    text = _PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def swap_left_right(text: str) -> str:
    """'left' <-> 'right' (whole words, lower-case text): a horizontal flip keeps the caption true."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


# ----------------------------------------------------------------------- tokens of one text

#: the form the reference's tokenizer gives one text: ``[CLS] words`` (its
#: build_inputs_with_special_tokens adds no [SEP] to a single sequence)
REFERENCE_TEXT_FORM = "cls_only"
#: the form our runs used before ``data.text_form`` existed (Hugging Face BERT's default):
#: a checkpoint, export or saved config that records no form was trained on it
LEGACY_TEXT_FORM = "cls_sep"
#: what each form looks like, for messages
TEXT_FORM_SHAPES = {"cls_only": "[CLS] words", "cls_sep": "[CLS] words [SEP]"}


def encode_texts(tokenizer, texts: Sequence[str], max_tokens: int, text_form: str,
                 end_with_sep: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), int64 [len(texts), max_tokens]: each text as ``[CLS] word pieces`` (text
    form "cls_only") or ``[CLS] word pieces [SEP]`` ("cls_sep"), then [PAD] up to exactly
    ``max_tokens`` (fixed shapes across ranks and steps); mask 1 on the real tokens.

    Every single text the model reads is tokenised here (captions, questions, hypotheses,
    expressions, answers), whatever special tokens the tokenizer's own post-processor adds.
    ``max_tokens`` counts the special tokens, as the reference's ``max_length`` does: at most
    ``max_tokens - 1`` word pieces with "cls_only", one fewer with "cls_sep"; the cut falls
    after the last whole piece that fits, mid-word if need be, as the reference's does.
    ``end_with_sep``: overrides the form's [SEP] (VQA answers always end with it, as the
    reference appends it to every answer)."""
    if text_form not in TEXT_FORM_SHAPES:
        raise ValueError(f"text form must be one of {', '.join(TEXT_FORM_SHAPES)}, got {text_form!r}")
    sep = text_form == "cls_sep" if end_with_sep is None else end_with_sep
    room = max_tokens - 1 - int(sep)
    if room < 1:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for a word piece")
    texts = list(texts)
    ids = torch.full((len(texts), max_tokens), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(texts), max_tokens), dtype=torch.int64)
    if not texts:
        return ids, mask
    pieces = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    for row, words in enumerate(pieces):
        tokens = [tokenizer.cls_token_id, *words] + ([tokenizer.sep_token_id] if sep else [])
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, :len(tokens)] = 1
    return ids, mask


def text_form_problem(recorded: str, wanted: str, what: str) -> Optional[str]:
    """None when ``recorded`` (the form ``what`` was trained on) is ``wanted`` (this run's
    data.text_form); else one sentence naming both forms and the way out."""
    if recorded == wanted:
        return None
    return (f"{what} was trained on texts tokenised as {recorded} ({TEXT_FORM_SHAPES.get(recorded, '?')}), "
            f"this run tokenises them as {wanted} ({TEXT_FORM_SHAPES.get(wanted, '?')}): set "
            f"data.text_form={recorded} to match it")
