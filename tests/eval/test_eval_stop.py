"""Every evaluation loop reads the stop flag between its batches (albef_ds/train/stop.py):
a SIGTERM ends it at the next batch with Interrupted naming the signal and where it was,
not minutes later at the end (the demo's evaluation went on for 2.5 minutes after one).
``albef-ds eval-retrieval`` ended by a real signal: tests/cli/test_eval_stop.py."""
import signal

import pytest
import torch

from albef_ds.errors import Interrupted
from albef_ds.eval.compositional import evaluate_compositional, set_from_entries
from albef_ds.eval.retrieval import evaluate
from albef_ds.eval.tasks import TaskEvaluator
from albef_ds.train.stop import StopFlag
from tests.support.retrieval import fake_io, fake_split


class SignalledAfter(StopFlag):
    """A flag that receives SIGTERM once ``batches`` batches have been let through."""

    def __init__(self, batches: int):
        super().__init__(handle_signals=False)
        self.batches, self.checks = batches, 0

    def raise_if_requested(self, during: str) -> None:
        self.checks += 1
        if self.checks > self.batches and not self.requested:
            self._handler(signal.SIGTERM, None)
        super().raise_if_requested(during)


def tiny_model():
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    cfg = load_config("tiny", ["model.image_res=32", "model.vocab_size=50", "model.queue_size=64"])
    torch.manual_seed(0)
    return ALBEF(cfg.model).eval()


def counting(load_images):
    calls = []

    def load(indices):
        calls.append(list(indices))
        return load_images(indices)
    return load, calls


@pytest.mark.parametrize("batches, phase, images_loaded", [(4, "encode texts", 0), (14, "encode images", 2)])
def test_retrieval_stops_at_the_next_batch(batches, phase, images_loaded):
    load_images, tokenize = fake_io(32, 50)
    load, calls = counting(load_images)
    flag = SignalledAfter(batches)  # 12 texts, then 6 images, one per batch
    with pytest.raises(Interrupted, match=rf"stopped by SIGTERM during the retrieval evaluation \({phase}\)") as e:
        evaluate(tiny_model(), fake_split(), load, tokenize, k_test=3, batch_size=1, stop=flag)
    assert len(calls) == images_loaded and e.value.exit_status == 143


def test_the_compositional_test_stops_at_the_next_batch():
    entries = [{"image": f"c{i}.png", "image_id": i, "kinds": ["true", "colour_swap"], "captions": ["a b", "b a"]}
               for i in range(5)]
    load_images, tokenize = fake_io(32, 50)
    load, calls = counting(load_images)
    with pytest.raises(Interrupted, match=r"during the compositional test \(2 of 5 images done\)"):
        evaluate_compositional(tiny_model(), set_from_entries(entries), load, tokenize, batch_size=2,
                               stop=SignalledAfter(1))
    assert len(calls) == 1


def test_a_task_evaluation_stops_at_the_next_chunk():
    scored = []

    def score(model, batch, device):
        scored.append(batch)
        return [{"correct": 1.0} for _ in batch]
    evaluator = TaskEvaluator("ve", [{"id": i} for i in range(10)], lambda e, _: e, list, score, chance=1 / 3,
                              batch_size=3)
    with pytest.raises(Interrupted, match=r"during the ve evaluation \(6 of 10 examples done\)"):
        evaluator(torch.nn.Linear(1, 1), torch.device("cpu"), SignalledAfter(2))
    assert len(scored) == 2
    assert evaluator(torch.nn.Linear(1, 1), torch.device("cpu"))["n"] == 10  # without a flag: as before
