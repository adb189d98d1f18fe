"""Checkpoint bookkeeping without an engine or ranks: the real backend's save path over a
fake DeepSpeed engine, and two ranks' collectives played in one process (tests/train)."""
from pathlib import Path


class FakeEngine:
    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed must never write its own 'latest'
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text("partial")
        if self.fail:
            raise OSError("disk full (simulated crash in the middle of a save)")


def fake_backend(fail=False):
    """The real backend's save path (save_latest=False, the universal info) over a fake engine."""
    from albef_ds.train.engines.deepspeed import DeepSpeedEngine as DeepSpeedBackend
    backend = object.__new__(DeepSpeedBackend)
    backend.engine = FakeEngine(fail)
    return backend


class FakeCollectives:
    """Rank 1 of two ranks, in one process: what rank 0 broadcasts is computed by rank 0's
    own manager (over rank 0's view of the file system); every gather gets rank 0's answer
    from ``rank0_answers`` (called with the gather's number and rank 1's object)."""

    def __init__(self, rank0_manager, rank0_answers):
        self.rank0, self.answers, self.gathers = rank0_manager, rank0_answers, 0

    def barrier(self):
        pass

    def broadcast_object(self, obj, src=0):
        return self.rank0_broadcasts.pop(0)

    def all_gather_object(self, obj):
        self.gathers += 1
        return [self.answers(self.gathers, obj), obj]


def broadcasts_of(manager, resume):
    """What rank 0 broadcasts while resolving ``resume`` alone (as if every rank agreed)."""
    sent = []

    class Record(FakeCollectives):
        def broadcast_object(self, obj, src=0):
            sent.append(obj)
            return obj

        def all_gather_object(self, obj):
            return [obj, obj]
    manager.comm = Record(None, None)
    manager.resolve(resume)
    return sent
