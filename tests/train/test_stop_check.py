"""The stop check without a host sync every step (train.stop_check_every, train.stop_check_async):
when a requested stop is taken, and, end to end, that such a stop still commits a
checkpoint and resumes onto the uninterrupted run's losses, bit for bit."""
import json
import os
from pathlib import Path

import pytest
import torch

from albef_ds.train.stop import EXIT_PREEMPTED, StopCheck

from tests.support.launch import in_process

STEPS = 12
#: the SIGTERM arrives during this micro-step (1 rank, no accumulation: step 5)
STOP_AT = 5


class Flag:
    """A StopFlag without signal handlers: requested from step ``at`` on."""

    def __init__(self, at: int):
        self.at, self.step, self.signal_name = at, 0, "test"

    @property
    def requested(self):
        return self.step >= self.at

    def agreed(self, device):
        return bool(torch.tensor([1.0 if self.requested else 0.0], device=device).item() > 0)


def stop_step(every: int, asynchronous: bool, at: int, steps: int = 40):
    flag = Flag(at)
    check = StopCheck(flag, every, asynchronous)
    for step in range(1, steps + 1):
        flag.step = step
        if check(step, torch.device("cpu")):
            return step
    return None


@pytest.mark.parametrize("every", [1, 3, 4, 10])
@pytest.mark.parametrize("at", [1, 5, 7, 12])
def test_a_stop_requested_after_step_k_is_taken_within_the_stated_steps(every, at):
    sync, asyn = stop_step(every, False, at), stop_step(every, True, at)
    assert sync == -(-at // every) * every  # the first multiple of N at or after k: <= k + N - 1
    assert at < asyn <= at + every and asyn == sync + 1  # read a step after the reduce started
    assert stop_step(1, False, at) == at  # the default: the step it was requested at


def test_no_stop_requested_is_never_taken_and_drain_leaves_nothing_pending():
    check = StopCheck(Flag(10**9), 2, True)
    assert not any(check(step, torch.device("cpu")) for step in range(1, 9))
    assert check.pending is not None
    check.drain()
    assert check.pending is None


# ---------------------------------------------------------------------- end to end (slow)

def command(run_dir: Path, data, tok, extra=()) -> list[str]:
    args = ["pretrain", "--config", "tiny", "--run-dir", str(run_dir),
            "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}",
            "--set", f"train.max_steps={STEPS}", "--set", "train.micro_batch_size=8",
            "--set", "train.warmup_steps=2", "--set", "model.vision_depth=2", "--set", "model.text_depth=2",
            "--set", "model.fusion_layer=1", "--set", "logging.log_every=1", "--set", "checkpoint.every_steps=100",
            "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false", "--set",
            "data.num_workers=0", *extra]
    return args


def stop_at_micro_step(monkeypatch, at: int) -> None:
    """A SIGTERM (as scancel or a preemption sends) to this process during its ``at``-th
    micro-step (the MLM masking of that step), so the stop is requested at a known step."""
    import signal

    import albef_ds.losses as losses
    real, calls = losses.mask_tokens, {"n": 0}

    def mask_tokens_then_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(losses, "mask_tokens", mask_tokens_then_stop)


def losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["loss_itc"], r["loss_itm"], r["loss_mlm"]) for r in rows
            if "event" not in r}  # (a resume's marker row)


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    data, tok = synth_data
    run = tmp_path_factory.mktemp("stopref") / "run"
    code, out = in_process(command(run, data, tok))
    assert code == 0, out[-3000:]
    return losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("every,asynchronous,expected", [(4, False, 8), (4, True, 9)])
def test_a_stop_every_n_steps_commits_a_checkpoint_and_resumes_exactly(synth_data, reference, tmp_path, monkeypatch,
                                                                        every, asynchronous, expected):
    """1 rank, in-process: a rank's stop path is the same in a process of its own."""
    data, tok = synth_data
    run = tmp_path / "run"
    extra = ["--set", f"train.stop_check_every={every}", "--set", f"train.stop_check_async={str(asynchronous).lower()}"]
    with monkeypatch.context() as patched:
        stop_at_micro_step(patched, STOP_AT)
        code, out = in_process(command(run, data, tok, extra))
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert f"checkpoint at step {expected} committed" in out, out[-3000:]
    assert (run / "checkpoints" / f"step_{expected:08d}").is_dir()
    assert max(losses(run)) == expected
    code, out = in_process(command(run, data, tok, extra + ["--resume", "auto"]))
    assert code == 0, out[-3000:]
    assert losses(run) == reference  # every step's losses, bit for bit, across the stop
