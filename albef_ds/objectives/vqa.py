"""VQA as ALBEF does it: answer generation. The question is fused with the image by the
text + fusion encoder; a 6-layer causal answer decoder (albef_ds/models/decoder.py),
initialised from the fusion layers, reads the fused question states and is trained to
generate each answer, weighted by how many annotators gave it; momentum distillation of
the decoder's token distributions (the reference's model_vqa.py). Paper: 74.54 / 75.84
test-dev (4M / 14M).

At test time each question's answer is picked from a fixed candidate list
(task.answer_list, the reference's answer_list.json): the k most likely by the first
token, then re-ranked by the whole answer's likelihood (:func:`rank_answers`). Scored by
VQA accuracy, min(#annotators who gave the answer / 3, 1); the results file is the
official submission format ``[{"question_id": int, "answer": str}, ...]``.

Annotation (the reference's vqa_*.json / vg_qa.json): ``[{"question_id", "question",
"answer": [human answers] (vqa) or str (vg), "image", "dataset": "vqa" | "vg"}, ...]``;
test files may lack "answer" (results only, no accuracy). Image paths are relative to
task.image_root (one root: put VQA and VG images under it).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..data import encode_texts, make_eval_transform
from ..data.tasks import (BadEntry, build_task_loader, image_root_of, open_image, read_examples, read_train_examples,
                          require, task_train_transform, text_field)
from ..data.text import clean_caption
from ..errors import ConfigError
from ..losses import at_least_fp32
from ..models.decoder import BertLMHeadDecoder, answer_nll
from .base import Objective, StepContext, alpha_at
from .classify import PRETRAINING_ONLY

#: weight of a Visual Genome answer (one annotator), as the reference gives it
VG_WEIGHT = 0.5
#: tokens of an answer: [CLS] answer words [SEP] (the reference pads answers to the longest
#: and never cuts them; here a longer answer keeps its [SEP] and loses its last word pieces)
MAX_ANSWER_TOKENS = 10


def vqa_score(answer: str, human_answers: list[str]) -> float:
    """VQA accuracy of one prediction: min(#annotators who gave it / 3, 1)."""
    return min(sum(a == answer for a in human_answers) / 3.0, 1.0)


def read_answer_list(path: str | None) -> list[str]:
    """The candidate answers VQA evaluation ranks (task.answer_list: the reference's
    answer_list.json, a JSON list of strings); ConfigError naming the key or the file."""
    if not path:
        raise ConfigError("config key 'task.answer_list': VQA evaluation ranks a candidate list (the reference's "
                          "answer_list.json): --set task.answer_list=PATH")
    if not Path(path).is_file():
        raise ConfigError(f"config key 'task.answer_list': file not found: {path}")
    try:
        answers = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key 'task.answer_list': {path}: not valid JSON ({e})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ConfigError(f"config key 'task.answer_list': {path}: expected a JSON list of answer strings")
    return answers


def answer_weights(answers) -> tuple[list[str], list[float]]:
    """Distinct answers and their weights: the share of annotators who gave each."""
    counts = Counter(answers)
    return list(counts), [n / len(answers) for n in counts.values()]


@torch.no_grad()
def rank_answers(decoder, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                 answer_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Index into the candidate list of each question's best answer.

    ``states`` [Q, Ls, W] / ``states_mask`` [Q, Ls]: fused questions; ``answer_ids`` /
    ``answer_mask`` [N, La]: every candidate, tokenised ([CLS] first). The k candidates
    whose first token is most likely are scored by their whole log-likelihood plus the
    first token's log-probability once more: the reference's rank_answer adds the
    first-token log-probability to a sequence loss that already holds it, and ranking as
    it does keeps our numbers comparable with its."""
    q, n = states.shape[0], answer_ids.shape[0]
    k = min(k, n)
    start = answer_ids[:1, :1].expand(q, 1)
    first = at_least_fp32(decoder(start, torch.ones_like(start), states, states_mask)[:, 0]).softmax(-1)
    first = first.index_select(1, answer_ids[:, 1])  # [Q, N]: p(first token of each candidate)
    top_p, top_idx = first.topk(k, dim=1)  # [Q, k]
    ids, mask = answer_ids[top_idx.reshape(-1)], answer_mask[top_idx.reshape(-1)]
    rows = torch.arange(q, device=states.device).repeat_interleave(k)
    logits = decoder(ids, mask, states[rows], states_mask[rows])
    nll = answer_nll(logits, ids.masked_fill(mask == 0, -100)).view(q, k)
    total = top_p.log() - nll
    return top_idx.gather(1, total.argmax(1, keepdim=True)).squeeze(1)


class VQAObjective(Objective):
    name = "vqa"
    data = "task"
    reports_pretraining_flops = False
    log_keys = ("loss", "alpha")
    progress_keys = ("loss",)
    unused_parts = PRETRAINING_ONLY
    head_prefixes = ("text_decoder", "text_decoder_m")
    reference_layout = ("visual_encoder.", "text_encoder.", "text_decoder.",
                        "visual_encoder_m.", "text_encoder_m.", "text_decoder_m.")
    reference_text_is_bert_model = True

    def extend_model(self, model) -> None:
        """The answer decoder from the text encoder's embeddings, fusion layers and MLM head;
        its momentum copy from the MOMENTUM text encoder's, as the reference's VQA.py maps a
        pretraining checkpoint's ``text_encoder_m`` onto ``text_decoder_m`` (the checkpoint
        has loaded already: build_model)."""
        cfg = model.cfg
        decoder = BertLMHeadDecoder(cfg, num_layers=cfg.text_depth - cfg.fusion_layer)
        decoder.init_from_encoder(model.text_encoder)
        model.add_head("text_decoder", decoder, momentum=self.cfg.task.distill)
        if self.cfg.task.distill:
            model.text_decoder_m.init_from_encoder(model.text_encoder_m)

    # ---------------------------------------------------------------- data
    def parse(self, entry, need_answer: bool = True) -> dict:
        require(entry, ("question", "image") + (("answer",) if need_answer else ()))
        example = {"question": text_field(entry, "question"), "image": entry["image"],
                   "question_id": entry.get("question_id")}
        if "answer" in entry:
            answers = entry["answer"]
            if entry.get("dataset", "vqa") == "vg":
                if not isinstance(answers, str) or not answers:
                    raise BadEntry("bad_answer", f"vg answer {answers!r} is not a string")
                example.update(answers=[answers], weights=[VG_WEIGHT], human=[answers])
            else:
                if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                    raise BadEntry("bad_answer", f"answer {answers!r} is not a non-empty list of strings")
                distinct, weights = answer_weights(answers)
                example.update(answers=distinct, weights=weights, human=answers)
        return example

    def _sample_loader(self, root: Path, train: bool):
        cfg = self.cfg
        d = cfg.data
        # no flip: a flipped image would contradict "on the left" questions and answers
        transform = task_train_transform(cfg, flip=False) if train else make_eval_transform(cfg.model.image_res)

        def load(example: dict, rng: Optional[random.Random]) -> dict:
            img = open_image(root, example["image"])
            image = transform(img) if rng is None else transform(img, rng)[0]
            return {"image": image, "question": clean_caption(example["question"], d.max_words),
                    "answers": example.get("answers", []), "weights": example.get("weights", []),
                    "question_id": example["question_id"], "human": example.get("human"),
                    "key": str(example["index"])}
        return load

    def collate(self, samples: list[dict]) -> dict:
        d = self.cfg.data
        q_ids, q_mask = encode_texts(self.tokenizer, [s["question"] for s in samples], d.max_tokens, d.text_form)
        answers = [a for s in samples for a in s["answers"]]
        batch = {"image": torch.stack([s["image"] for s in samples]), "question_ids": q_ids, "question_mask": q_mask,
                 "answer_counts": torch.tensor([len(s["answers"]) for s in samples], dtype=torch.int64),
                 # float64: the shares as computed (cast to the loss's dtype in compute)
                 "answer_weights": torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float64),
                 "question_id": [s["question_id"] for s in samples], "human": [s["human"] for s in samples],
                 "key": [s["key"] for s in samples]}
        if answers:
            batch["answer_ids"], batch["answer_mask"] = self.encode_answers(answers)
        return batch

    def encode_answers(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] answer [SEP]`` whatever data.text_form says: the reference appends [SEP]
        to every answer (its ``eos``), the end the decoder learns to generate."""
        return encode_texts(self.tokenizer, answers, MAX_ANSWER_TOKENS, self.cfg.data.text_form, end_with_sep=True)

    def make_loader(self, cfg, rank, world, local_world, local_rank, run_dir):
        examples = read_train_examples(cfg, self.parse, rank)
        root = image_root_of(cfg.task.image_root, cfg.task.train_files[0])
        return build_task_loader(cfg, examples, self._sample_loader(root, train=True), self.collate, rank, world)

    # ---------------------------------------------------------------- step
    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        to = lambda t: t.to(ctx.device, non_blocking=True)  # noqa: E731
        return {"images": batch["image"].to(ctx.device, dtype=ctx.dtype, non_blocking=True),
                "question_ids": to(batch["question_ids"]), "question_mask": to(batch["question_mask"]),
                "answer_ids": to(batch["answer_ids"]), "answer_mask": to(batch["answer_mask"]),
                "answer_counts": to(batch["answer_counts"]), "answer_weights": to(batch["answer_weights"]),
                "alpha": alpha_at(ctx.step, ctx.steps_per_epoch, self.cfg.model.alpha, self.cfg.train.alpha_ramp_epochs)}

    @staticmethod
    def fused_questions(model, images, question_ids, question_mask, momentum: bool = False) -> torch.Tensor:
        image_embeds = model.encode_image(images, momentum)
        text = model.encode_text(question_ids, question_mask, momentum)
        return model.fuse(text, question_mask, image_embeds, momentum=momentum)

    def compute(self, model, images, question_ids, question_mask, answer_ids, answer_mask, answer_counts,
                answer_weights, alpha) -> dict:
        rows = torch.arange(images.shape[0], device=images.device).repeat_interleave(answer_counts)
        states = self.fused_questions(model, images, question_ids, question_mask)
        logits = model.text_decoder(answer_ids, answer_mask, states[rows], question_mask[rows])
        soft = None
        if self.cfg.task.distill:
            with torch.no_grad():
                states_m = self.fused_questions(model, images, question_ids, question_mask, momentum=True)
                logits_m = model.text_decoder_m(answer_ids, answer_mask, states_m[rows], question_mask[rows])
                soft = F.softmax(at_least_fp32(logits_m[:, :-1]), dim=-1)
        nll = answer_nll(logits, answer_ids.masked_fill(answer_mask == 0, -100), soft_targets=soft, alpha=alpha)
        loss = (answer_weights.to(nll.dtype) * nll).sum() / images.shape[0]
        return {"loss": loss, "alpha": loss.new_tensor(alpha)}

    # ---------------------------------------------------------------- evaluation
    @classmethod
    def check_settings(cls, cfg, evaluates: bool) -> None:
        if evaluates:
            read_answer_list(cfg.task.answer_list)

    def candidates(self) -> list[str]:
        return read_answer_list(self.cfg.task.answer_list)

    def evaluator_for(self, path: str, log=print):
        from ..eval.tasks import TaskEvaluator
        examples = read_examples(path, lambda e: self.parse(e, need_answer=False), log)[0]
        candidates = self.candidates()
        answer_ids, answer_mask = self.encode_answers(candidates)
        k = self.cfg.task.k_test

        @torch.no_grad()
        def score(model, batch, device):
            dtype = next(model.parameters()).dtype
            states = self.fused_questions(model, batch["image"].to(device, dtype), batch["question_ids"].to(device),
                                          batch["question_mask"].to(device))
            best = rank_answers(model.text_decoder, states, batch["question_mask"].to(device),
                                answer_ids.to(device), answer_mask.to(device), k).cpu()
            out = []
            for qid, human, i in zip(batch["question_id"], batch["human"], best.tolist()):
                answer = candidates[i]
                out.append({"question_id": qid, "answer": answer,
                            "correct": vqa_score(answer, human) if human else 0.0})
            return out

        humans = [a for e in examples for a in e.get("human") or []]
        chance = 0.0
        if humans:  # always giving the most common human answer
            common = Counter(humans).most_common(1)[0][0]
            chance = sum(vqa_score(common, e["human"]) for e in examples if e.get("human")) / len(examples)
        evaluator = TaskEvaluator(self.name, examples, self._sample_loader(image_root_of(self.cfg.task.image_root, path),
                                                                          train=False),
                                  self.collate, score, chance=chance, batch_size=self.cfg.eval.batch_size)
        evaluator.results_keys = ("question_id", "answer")  # the official submission format
        return evaluator
