"""Offline WordPiece vocabulary and the local fast tokenizer."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import BertTokenizerFast

from albef_ds.tokenizer import SPECIAL_TOKENS, build_vocab, load_tokenizer

CAPTIONS = ["A red circle to the left of a blue square.", "Three green triangles!",
            "a big yellow diamond on a gray background"] * 20


def test_build_vocab_and_load(tmp_path):
    out = tmp_path / "tok"
    built = build_vocab(CAPTIONS, out, vocab_size=200)
    tok = load_tokenizer(out)
    assert isinstance(tok, BertTokenizerFast) and isinstance(built, BertTokenizerFast)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.pad_token_id == 0 and tok.mask_token == "[MASK]"
    enc = tok("A RED Circle", padding="max_length", max_length=8)
    assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids[4] == tok.sep_token_id
    assert enc.input_ids[5:] == [0] * 3 and enc.attention_mask == [1] * 5 + [0] * 3
    assert tok.convert_ids_to_tokens(enc.input_ids[1:4]) == ["a", "red", "circle"]  # lower-cased
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == "a red circle"
    assert tok.convert_ids_to_tokens(tok("purple").input_ids)[1] != "purple"  # unseen: pieces or [UNK]


def test_build_vocab_from_files_and_dataset_folder(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("\n".join(CAPTIONS))
    folder = tmp_path / "dataset"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["an orange hexagon"] * 5}), folder / "manifest.parquet")
    tok = build_vocab([str(f), str(folder)], tmp_path / "tok", vocab_size=300)
    assert len(tok) <= 300
    assert {"triangles", "orange", "hexagon"} <= set(tok.get_vocab())
    small = build_vocab([str(f)], tmp_path / "tok_small", vocab_size=60)
    assert len(small) == 60


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "empty")
