"""The downstream tasks' own logic against plain computations: VQA answer ranking and
scoring, NLVR2's text-assignment draws, grounding's box choice and IoU, the classifiers'
distillation loss, each task's reader (bad entries named by reason), and the synthetic
task generator (labels true of the scenes it drew)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from albef_ds.config import load_config
from albef_ds.data.tasks import BadEntry
from albef_ds.losses import distilled_cross_entropy
from albef_ds.models.decoder import BertLMHeadDecoder
from albef_ds.objectives.grounding import GroundingObjective, best_box, iou
from albef_ds.objectives.nlvr2 import NLVR2Objective
from albef_ds.objectives.nlvr_ta import assign_images
from albef_ds.objectives.ve import VEObjective
from albef_ds.objectives.vqa import VQAObjective, answer_weights, rank_answers, vqa_score


def small_cfg():
    return load_config("tiny", ["model.text_width=32", "model.text_heads=2", "model.text_intermediate=64",
                                "model.text_depth=4", "model.fusion_layer=2", "model.vocab_size=40",
                                "model.hidden_dropout=0", "model.attention_dropout=0"])


# ------------------------------------------------------------------------------- VQA

def brute_force_best(decoder, states, mask, answers, answer_mask, k):
    """The reference's rule written out: top k candidates by p(first token | start), then
    argmax of log p(first) + sum_t log p(token t | tokens < t) (the first token counted again)."""
    best = []
    for q in range(states.shape[0]):
        start = answers[:1, :1]
        first = decoder(start, torch.ones_like(start), states[q:q + 1], mask[q:q + 1])[0, 0].log_softmax(-1)
        first_lp = [float(first[answers[c, 1]]) for c in range(len(answers))]
        top = sorted(range(len(answers)), key=lambda c: -first_lp[c])[:k]
        totals = {}
        for c in top:
            ids, m = answers[c:c + 1], answer_mask[c:c + 1]
            lp = decoder(ids, m, states[q:q + 1], mask[q:q + 1])[0].log_softmax(-1)
            seq = sum(float(lp[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1) if m[0, t + 1])
            totals[c] = first_lp[c] + seq
        best.append(max(totals, key=totals.get))
    return best


@pytest.mark.parametrize("k", [3, 6])
def test_rank_answers_equals_the_reference_rule_written_out(k):
    cfg = small_cfg().model
    torch.manual_seed(0)
    decoder = BertLMHeadDecoder(cfg, num_layers=2).eval()
    g = torch.Generator().manual_seed(1)
    states = torch.randn(5, 7, cfg.text_width, generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    answers = torch.randint(5, cfg.vocab_size, (6, 4), generator=g)
    answers[:, 0] = 2  # the start token
    answer_mask = torch.ones_like(answers)
    answer_mask[0, 3:] = 0
    answer_mask[4, 2:] = 0
    with torch.no_grad():
        got = rank_answers(decoder, states, mask, answers, answer_mask, k).tolist()
        want = brute_force_best(decoder, states, mask, answers, answer_mask, k)
    assert got == want


def test_vqa_score_and_answer_weights():
    assert vqa_score("red", ["red"] * 10) == 1.0
    assert vqa_score("red", ["red", "red", "blue"] + ["green"] * 7) == pytest.approx(2 / 3)
    assert vqa_score("red", ["blue"] * 10) == 0.0
    answers, weights = answer_weights(["a", "b", "a", "a"])
    assert answers == ["a", "b"] and weights == [0.75, 0.25]


def test_vqa_reader_names_bad_entries():
    obj = VQAObjective(small_cfg(), None)
    ok = obj.parse({"question_id": 1, "question": "what?", "answer": ["x", "y", "x"], "image": "i.jpg"})
    assert ok["answers"] == ["x", "y"] and ok["weights"] == [2 / 3, 1 / 3]
    vg = obj.parse({"question": "what?", "answer": "x", "image": "i.jpg", "dataset": "vg"})
    assert vg["weights"] == [0.5]
    for bad, reason in (({"question": "q", "image": "i"}, "missing_key"),
                        ({"question": "q", "image": "i", "answer": []}, "bad_answer"),
                        ({"question": " ", "image": "i", "answer": ["a"]}, "empty_text")):
        with pytest.raises(BadEntry) as e:
            obj.parse(bad)
        assert e.value.reason == reason
    assert "answers" not in obj.parse({"question": "q", "image": "i"}, need_answer=False)


# ------------------------------------------------------------------------------- NLVR2

def test_text_assignment_draws_mean_what_their_labels_say():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(64, 8, generator=g), dim=-1)
    left, right, label = assign_images(feats, torch.Generator().manual_seed(3))
    own = torch.arange(64)
    assert torch.equal(left[label == 0], own[label == 0]) and (right[label == 0] != own[label == 0]).all()
    assert torch.equal(right[label == 1], own[label == 1]) and (left[label == 1] != own[label == 1]).all()
    neither = label == 2
    assert (left[neither] != own[neither]).all() and (right[neither] != own[neither]).all()
    assert (left[neither] != right[neither]).all()
    counts = torch.bincount(label, minlength=3).tolist()
    assert all(8 <= c <= 36 for c in counts), counts  # about a third each
    again = assign_images(feats, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip((left, right, label), again))


def test_classification_readers_name_bad_entries():
    ve, nlvr = VEObjective(small_cfg(), None), NLVR2Objective(small_cfg(), None)
    assert ve.parse({"image": "123", "sentence": "a dog", "label": "neutral"})["label"] == 1
    assert nlvr.parse({"images": ["a.png", "b.png"], "sentence": "s", "label": "True"})["label"] == 1
    assert nlvr.parse({"images": ["a.png", "b.png"], "sentence": "s", "label": False})["label"] == 0
    cases = [(ve, {"image": "1", "sentence": "s", "label": "maybe"}, "bad_label"),
             (ve, {"image": "1", "label": "neutral"}, "missing_key"),
             (nlvr, {"images": ["a.png"], "sentence": "s", "label": "True"}, "bad_images"),
             (nlvr, {"images": ["a", "b"], "sentence": "s", "label": "yes"}, "bad_label")]
    for obj, entry, reason in cases:
        with pytest.raises(BadEntry) as e:
            obj.parse(entry)
        assert e.value.reason == reason


def test_distilled_cross_entropy_is_the_reference_mix():
    g = torch.Generator().manual_seed(0)
    logits, logits_m = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    alpha = 0.4
    want = 0.0
    for row, row_m, y in zip(logits.tolist(), logits_m.tolist(), labels.tolist()):
        logp = [x - math.log(sum(math.exp(v) for v in row)) for x in row]
        q = [math.exp(x) / sum(math.exp(v) for v in row_m) for x in row_m]
        want += (1 - alpha) * -logp[y] - alpha * sum(qc * lc for qc, lc in zip(q, logp))
    assert float(distilled_cross_entropy(logits, labels, logits_m, alpha)) == pytest.approx(want / 6, abs=1e-12)
    assert float(distilled_cross_entropy(logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels)))


# ------------------------------------------------------------------------------- grounding

def test_iou_and_the_box_choice():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 1, 1], [5, 5, 1, 1]) == 0.0
    heat = torch.zeros(20, 20)
    heat[12:18, 2:8] = 1.0  # rows (y) 12-17, columns (x) 2-7
    proposals = [[0, 0, 10, 10], [2, 12, 6, 6], [0, 0, 20, 20]]
    # sum / area^0.5: 36/6 = 6 beats the whole image's 36/20 and the empty box
    assert best_box(heat, proposals) == 1


def test_grounding_reader_checks_boxes():
    obj = GroundingObjective(small_cfg(), None)
    ok = obj.parse_eval({"image": "i.png", "text": "the dog", "ref_id": 3, "box": [1, 2, 3, 4],
                         "proposals": [[1, 2, 3, 4], [0, 0, 5, 5]]})
    assert ok["box"] == [1.0, 2.0, 3.0, 4.0] and len(ok["proposals"]) == 2
    for entry in ({"image": "i", "text": "t", "box": [1, 2, 3], "proposals": [[0, 0, 1, 1]]},
                  {"image": "i", "text": "t", "box": [1, 2, 3, 0], "proposals": [[0, 0, 1, 1]]},
                  {"image": "i", "text": "t", "box": [1, 2, 3, 4], "proposals": []}):
        with pytest.raises(BadEntry) as e:
            obj.parse_eval(entry)
        assert e.value.reason == "bad_box"


# ------------------------------------------------------------------------------- synth tasks

def test_synth_tasks_are_deterministic_and_true_of_their_scenes(tmp_path):
    from data_tools.synth import draw_scene
    from data_tools.synth_tasks import SynthTaskOptions, _true_statement, synth_tasks
    for out in (tmp_path / "a", tmp_path / "b"):
        synth_tasks(SynthTaskOptions(out=str(out), num_train=30, num_val=10, num_test=10, progress=False))
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix == ".json")
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    root = tmp_path / "a"
    load = lambda n: json.loads((root / n).read_text())  # noqa: E731
    facts = {f"images/test_{i:05d}.png": draw_scene(0, "task-test", i, 64)[2] for i in range(10)}
    ve = load("ve_test.json")
    assert [e["label"] for e in ve].count("entailment") == 10 == [e["label"] for e in ve].count("contradiction")
    for e in ve:
        truth = _true_statement(facts[e["image"]])
        if e["label"] == "entailment":
            assert e["sentence"] == truth
        elif e["label"] == "contradiction":
            assert e["sentence"] != truth
        else:
            assert e["sentence"].startswith(truth + ", ")
    answers = set(load("answer_list.json"))
    for e in load("vqa_test.json"):
        assert set(e["answer"]) <= answers and len(e["answer"]) == 10
        if e["question"].startswith("is there a "):
            colour, shape = e["question"][len("is there a "):-1].split()
            present = any(o["colour"] == colour and o["shape"] == shape for o in facts[e["image"]]["objects"])
            assert e["answer"][0] == ("yes" if present else "no")
    for e in load("grounding_test.json"):
        assert e["box"] in e["proposals"]
        assert e["box"] in [o["box"] for o in facts[e["image"]]["objects"]]
    labels = [e["label"] for e in load("nlvr_train.json")]
    assert set(labels) == {"True", "False"}


def test_task_log_lines_claim_no_pretraining_flops():
    """TFLOP/s and MFU are defined by the pretraining step's analytic FLOPs: the task
    objectives (other heads, no MLM) leave them out of their log lines."""
    from albef_ds.objectives import objective_class
    for name in ("ve", "nlvr2", "nlvr_ta", "vqa", "grounding"):
        assert not objective_class(name).reports_pretraining_flops, name
    assert objective_class("pretrain").reports_pretraining_flops
