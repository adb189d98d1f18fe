"""Caption text as ALBEF prepares it for pretraining."""
from __future__ import annotations

import re

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
