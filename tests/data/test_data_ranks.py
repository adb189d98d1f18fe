"""Two reader ranks (two processes, gloo): one epoch is split disjointly and covers the
dataset; a reader restored from a mid-epoch state delivers exactly the unseen samples,
with the same augmentation and captions as an uninterrupted run."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from albef_ds.distributed import free_port

from tests.support.launch import REPO, env as env_for

pytestmark = pytest.mark.slow

BATCH = 8
STOP = 5  # batches per rank before the "preemption"


def run_ranks(tmp_path, name, data_dir, tok, world=2, set_local_world=True, extra=()):
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if set_local_world:
            rank_env["LOCAL_WORLD_SIZE"] = world
        out = tmp_path / f"{name}_rank{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, "-m", "tests.support.drivers.loader_worker", "--dir", str(data_dir), "--tokenizer", str(tok), "--out", str(out),
             "--batch", str(BATCH), "--workers", "1", *extra], cwd=REPO, env=env_for(**rank_env))))
    results = []
    for out, p in procs:
        assert p.wait(timeout=180) == 0, f"rank process failed ({name})"
        results.append(json.loads(out.read_text()))
    return results


@pytest.fixture(scope="module")
def full_epoch(synth_small, tmp_path_factory):
    """An uninterrupted epoch on 2 ranks; rank 0 saves the loader state after STOP batches."""
    data, tok = synth_small
    tmp = tmp_path_factory.mktemp("ranks")
    state = tmp / "loader_state.json"
    results = run_ranks(tmp, "full", data / "train", tok,
                        extra=("--save-state-at", str(STOP), "--state", str(state)))
    return results, state


def _keys(result):
    return [k for b in result["batches"] for k in b["keys"]]


def test_two_ranks_disjoint_and_cover_the_dataset(synth_small, full_epoch):
    data, _ = synth_small
    full_epoch, _ = full_epoch
    all_keys = set(pq.read_table(data / "train" / "manifest.parquet").column("key").to_pylist())
    assert len(all_keys) == 256 and 256 % (2 * BATCH) == 0
    k0, k1 = _keys(full_epoch[0]), _keys(full_epoch[1])
    assert len(k0) == len(k1) == 128
    assert len(set(k0)) == 128 and len(set(k1)) == 128   # no repeat within a rank
    assert not set(k0) & set(k1)                          # disjoint across ranks
    assert set(k0) | set(k1) == all_keys                  # together: the whole dataset
    b = full_epoch[0]["batches"][0]
    assert b["shapes"] == [[BATCH, 3, 32, 32], [BATCH, 16]]
    assert b["dtypes"] == ["torch.float32", "torch.int64", "torch.int64", "torch.int64"]


def test_mid_epoch_resume_gives_exactly_the_unseen_samples_same_augmentation(synth_small, full_epoch, tmp_path):
    data, tok = synth_small
    full_epoch, state = full_epoch
    saved = json.loads(state.read_text())
    assert saved["epoch"] == 0 and saved["sample_in_epoch"] == STOP * BATCH * 2
    # a fresh job; LOCAL_WORLD_SIZE left unset: build_train_loader must work it out (2 ranks, one host)
    tail = run_ranks(tmp_path, "tail", data / "train", tok, set_local_world=False,
                     extra=("--state", str(state)))
    for rank in range(2):
        full = full_epoch[rank]["batches"]
        t = tail[rank]["batches"]
        assert len(t) == len(full) - STOP
        assert t == full[STOP:]  # exactly the unseen batches: same keys, augmented pixels, token ids
    seen = {k for r in full_epoch for b in r["batches"][:STOP] for k in b["keys"]}
    rest = set(_keys(tail[0]) + _keys(tail[1]))
    assert not seen & rest and len(seen | rest) == 256


def test_device_path_two_ranks_resume_exactly_and_match_the_cpu_path(synth_small, full_epoch, tmp_path):
    """data.decode_on: device (run on the CPU): the same split, keys and caption ids as the
    PIL path, and a mid-epoch resume that repeats the uninterrupted run's pixels exactly."""
    data, tok = synth_small
    cpu_epoch, _ = full_epoch
    state = tmp_path / "device_state.json"
    device = ("--decode-on", "device")
    full = run_ranks(tmp_path, "dev_full", data / "train", tok,
                     extra=("--save-state-at", str(STOP), "--state", str(state), *device))
    tail = run_ranks(tmp_path, "dev_tail", data / "train", tok, extra=("--state", str(state), *device))
    for rank in range(2):
        f, c = full[rank]["batches"], cpu_epoch[rank]["batches"]
        assert [b["keys"] for b in f] == [b["keys"] for b in c]
        assert [b["text_ids"] for b in f] == [b["text_ids"] for b in c]  # same flips, same swaps
        assert f[0]["shapes"] == c[0]["shapes"] and f[0]["dtypes"] == c[0]["dtypes"]
        assert tail[rank]["batches"] == f[STOP:]
