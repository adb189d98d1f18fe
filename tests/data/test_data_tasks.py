"""Task annotation reading (bad entries counted and named) and the resumable task loader:
a resumed loader yields exactly the batches the uninterrupted one would have, at the same
or another world size, and per-sample augmentation depends on (seed, epoch, example) only."""
import json

import pytest

from albef_ds.data.tasks import BadEntry, TaskDataset, TaskLoader, read_examples, require
from albef_ds.errors import ConfigError


def parse(entry):
    require(entry, ("text", "label"))
    if entry["label"] not in ("a", "b"):
        raise BadEntry("bad_label", f"label {entry['label']!r}")
    return {"text": entry["text"], "label": entry["label"]}


def test_bad_entries_are_skipped_counted_and_named(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"text": "x", "label": "a"}, {"text": "y"}, "not an object",
                                {"text": "z", "label": "c"}, {"text": "w", "label": "b"}, {"label": "a"}]))
    lines = []
    examples, report = read_examples(path, parse, lines.append)
    assert [e["index"] for e in examples] == [0, 4]
    assert report.total == 6 and report.kept == 2
    assert dict(report.reasons) == {"missing_key": 2, "not_an_object": 1, "bad_label": 1}
    (line,) = lines
    assert str(path) in line and "2 of 6 entries used" in line
    assert "entry 1: no 'label'" in line and "entry 5: no 'text'" in line and "entry 3: label 'c'" in line


def test_a_file_without_usable_entries_is_an_error_naming_it(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"text": "y"}]))
    with pytest.raises(ConfigError, match="ann.json: no usable entry"):
        read_examples(path, parse, lambda *_: None)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_examples(path, parse, lambda *_: None)
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "missing.json", parse, lambda *_: None)


def make_loader(n, batch, rank, world, seed=0):
    examples = [{"index": i} for i in range(n)]
    # each sample records its example and one draw of its augmentation RNG
    dataset = TaskDataset(examples, lambda e, rng: {"i": e["index"], "draw": rng.random()}, seed=seed)
    collate = lambda s: {"i": [x["i"] for x in s], "draw": [x["draw"] for x in s]}  # noqa: E731
    return TaskLoader(dataset, collate, batch, rank, world, shuffle_seed=7)


def test_ranks_split_each_epoch_without_overlap_and_epochs_reshuffle():
    loaders = [make_loader(50, 4, r, 3) for r in range(3)]
    assert len(loaders[0]) == 50 // 12
    first = [[b["i"] for b in l] for l in loaders]
    second = [[b["i"] for b in l] for l in loaders]
    seen = [i for rank in first for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 48
    assert first != second  # a new order per epoch
    # global batch k is the k-th run of world x batch examples of the epoch's order
    order = [i for k in range(len(loaders[0])) for r in range(3) for i in first[r][k]]
    assert len(set(order[:12])) == 12


def test_resume_mid_epoch_gives_the_remaining_batches_exactly():
    full = make_loader(40, 4, 0, 1)
    everything = [b for _ in range(2) for b in full]
    interrupted = make_loader(40, 4, 0, 1)
    it = iter(interrupted)
    head = [next(it) for _ in range(3)]
    state = interrupted.state_dict()
    resumed = make_loader(40, 4, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed) + list(resumed)
    assert head + rest[: len(everything) - 3] == everything


def test_resume_on_another_world_size_continues_after_the_examples_done():
    one = make_loader(48, 4, 0, 1)
    it = iter(one)
    done = [i for _ in range(6) for i in next(it)["i"]]  # 24 examples = 3 global batches of 2 x 4
    state = one.state_dict()
    two = [make_loader(48, 4, r, 2) for r in range(2)]
    for l in two:
        l.load_state_dict(state)
    rest = [i for batches in zip(*[list(l) for l in two]) for b in batches for i in b["i"]]
    assert sorted(done + rest) == list(range(48)) and not set(done) & set(rest)


def test_augmentation_draws_depend_on_seed_epoch_and_example_only():
    first, second = make_loader(20, 4, 0, 1), make_loader(20, 4, 0, 1)
    a = [b for _ in range(2) for b in first]
    b = [b for _ in range(2) for b in second]
    assert a == b
    draws = {}
    for batch in a:
        for i, d in zip(batch["i"], batch["draw"]):
            draws.setdefault(i, []).append(d)
    assert all(len(set(v)) == 2 for v in draws.values())  # epoch 0 and 1 differ
    other_seed = [b for b in make_loader(20, 4, 0, 1, seed=1)]
    assert other_seed[0]["i"] == a[0]["i"] and other_seed[0]["draw"] != a[0]["draw"]


def test_a_changed_annotation_is_refused_on_resume():
    state = make_loader(40, 4, 0, 1).state_dict()
    with pytest.raises(ConfigError, match="same task.train_files"):
        make_loader(44, 4, 0, 1).load_state_dict(state)


def test_fewer_examples_than_a_global_batch_is_an_error():
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        make_loader(7, 4, 0, 2)
