"""The text tokenizer: a BERT WordPiece ``BertTokenizerFast`` from a local folder.

``load_tokenizer`` never touches a model hub (``local_files_only``); ``build_vocab`` trains
a lower-case BERT WordPiece vocabulary offline with the ``tokenizers`` library, for data
whose words ``bert-base-uncased`` does not cover or for tiny models (the synth demo uses
about 1k entries). Special tokens: [PAD]=0 (the model masks on it), [UNK], [CLS], [SEP],
[MASK], the same names and order of ids as ``bert-base-uncased``'s first special entries.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Union

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(path: Union[str, os.PathLike]):
    """A ``transformers.BertTokenizerFast`` from a local folder (tokenizer.json or vocab.txt)."""
    from transformers import BertTokenizerFast

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path} "
                                f"(build one with `albef-data build-vocab`)")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")
    tok = BertTokenizerFast.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None or tok.cls_token_id is None or tok.mask_token_id is None:
        raise ValueError(f"tokenizer in {path} lacks [PAD], [CLS] or [MASK]")
    return tok


def _caption_lines(sources: Union[str, os.PathLike, Iterable], not_utf8: Optional[dict] = None) -> Iterable[str]:
    """Captions from text files (one per line), dataset folders (manifest.parquet), or an
    iterable of strings; a single path is accepted too. A text file's lines that are not
    UTF-8 are left out, as ``albef-data convert`` rejects such a caption (bad_caption);
    ``not_utf8`` gets path -> [count, first line number]."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for item in sources:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.exists(item)):
            path = os.fspath(item)
            if os.path.isdir(path):
                import pyarrow.parquet as pq

                manifest = os.path.join(path, "manifest.parquet")
                if not os.path.exists(manifest):
                    raise FileNotFoundError(f"no manifest.parquet in {path}")
                pf = pq.ParquetFile(manifest)
                for batch in pf.iter_batches(columns=["caption"], batch_size=10_000):
                    yield from batch.column(0).to_pylist()
            else:
                with open(path, "rb") as f:
                    for number, raw in enumerate(f, 1):
                        try:
                            yield raw.decode("utf-8").rstrip("\r\n")
                        except UnicodeDecodeError:
                            if not_utf8 is not None:
                                not_utf8.setdefault(path, [0, number])[0] += 1
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"expected caption files, folders or strings, got {type(item).__name__}")


def build_vocab(caption_files_or_iterable, out_dir: Union[str, os.PathLike], vocab_size: int = 1024,
                report: Optional[Callable[[str], None]] = None):
    """Train a WordPiece vocabulary offline; write a folder ``load_tokenizer`` reads; return it loaded.

    Captions are cleaned as the loader cleans them (``clean_caption``) so the vocabulary
    sees the same text the model will. ``report``: told of the lines left out (not UTF-8).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    from albef_ds.data.text import clean_caption

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                                handle_chinese_chars=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        min_frequency=1, continuing_subword_prefix="##",
                                        show_progress=False)
    not_utf8: dict = {}
    lines = (clean_caption(c, max_words=10_000) for c in _caption_lines(caption_files_or_iterable, not_utf8))
    tok.train_from_iterator(lines, trainer=trainer)
    for path, (count, first) in not_utf8.items():
        if report is not None:
            report(f"{path}: {count} line(s) not valid UTF-8 left out (the first: line {first}); "
                   f"convert rejects such captions as bad_caption")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"{t} should have id {i}"
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]",
                             sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                             mask_token="[MASK]")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return load_tokenizer(out_dir)
