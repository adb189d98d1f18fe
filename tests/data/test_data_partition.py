"""Which shards a node reads: streaming's own partition and shuffle code over a simulated
CC12M-sized index (no data), with the loader's defaults."""
import numpy as np
import pytest
from streaming.base.partition import get_partitions
from streaming.base.shuffle import get_shuffle

from albef_ds.config import DataConfig
from albef_ds.data.dataset import DEFAULT_CANONICAL_NODES

pytestmark = pytest.mark.slow

#: CC12M converted at ~1,160 pairs per shard (the project's converter default shard size).
SHARDS, PER_SHARD = 9538, 1160
NODES, RANKS, WORKERS, BATCH = 8, 8, 8, 64


def shards_per_node(canonical_nodes: int, nodes: int = 2) -> list[int]:
    sizes = np.full(SHARDS, PER_SHARD, dtype=np.int64)
    bounds = np.cumsum(sizes)
    ids = get_partitions("relaxed", int(sizes.sum()), canonical_nodes, NODES, RANKS, WORKERS, BATCH, 0)
    # streaming's defaults (py1e, block max(4M / canonical nodes, 2^18)), seeded as our loader is
    block = max(4_000_000 // canonical_nodes, 1 << 18)
    shuffle = get_shuffle("py1e", sizes, canonical_nodes, DataConfig().shuffle_seed, 0, block)
    ids = np.where(ids != -1, shuffle[ids], -1)
    out = []
    for node in range(nodes):
        samples = ids[node].reshape(-1)
        out.append(len(np.unique(np.searchsorted(bounds, samples[samples >= 0], side="right"))))
    return out


def test_with_the_defaults_a_node_reads_about_its_share_of_the_shards():
    assert DataConfig().num_canonical_nodes is None  # the loader then uses DEFAULT_CANONICAL_NODES
    share = SHARDS / NODES
    for touched in shards_per_node(DEFAULT_CANONICAL_NODES):
        assert touched <= 2 * share, (touched, share)
    # The old default (1 canonical node) made every node read every shard.
    assert min(shards_per_node(1)) > 0.9 * SHARDS
