"""``albef-data build-vocab``: a WordPiece vocabulary trained offline (albef_ds.tokenizer)."""
from __future__ import annotations

import sys


def build_vocab_cmd(inputs: list[str], out: str, vocab_size: int) -> None:
    import os

    from albef_ds.tokenizer import build_vocab

    for p in inputs:
        if not os.path.exists(p):
            raise FileNotFoundError(f"caption input not found: {p}")
    tok = build_vocab(inputs, out, vocab_size, report=lambda line: print(f"build-vocab: {line}", file=sys.stderr))
    print(f"build-vocab: {len(tok)} tokens written to {out}", file=sys.stderr)
