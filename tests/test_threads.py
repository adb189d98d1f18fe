"""albef_ds/threads.py: each rank's share of the node's CPUs, or OMP_NUM_THREADS when set."""
from albef_ds.threads import choose


def test_a_set_omp_num_threads_is_honoured():
    assert choose(64, 8, 4, "3").threads == 3
    assert "OMP_NUM_THREADS=3" in choose(64, 8, 4, "3").why


def test_unset_each_rank_takes_its_share_after_the_loader_workers():
    # (CPUs, ranks on the node, loader workers per rank) -> threads, counted by hand
    table = {(2, 1, 1): 1, (2, 1, 0): 2, (2, 2, 1): 1, (16, 1, 2): 14, (16, 4, 2): 2, (64, 8, 4): 4,
             (64, 8, 8): 1, (96, 8, 6): 6, (1, 1, 4): 1}
    for (cpus, ranks, workers), want in table.items():
        got = choose(cpus, ranks, workers, None)
        assert got.threads == want, (cpus, ranks, workers, got)
        assert "OMP_NUM_THREADS unset" in got.why and f"{cpus} CPU(s)" in got.why


def test_a_malformed_value_falls_back_to_the_share():
    assert choose(16, 4, 2, "many").threads == 2
