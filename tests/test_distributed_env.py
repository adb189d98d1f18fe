"""albef_ds.distributed.read_launch_env under each launcher's variables (no processes)."""
import pytest

from albef_ds.distributed import pool_size, read_launch_env


def test_deepspeed_launcher_on_two_nodes_counts_the_ranks_of_one_node():
    # What the deepspeed launcher (pdsh runner) gives rank 5 of 2 nodes x 4 GPUs: no
    # LOCAL_WORLD_SIZE, LOCAL_SIZE instead.
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.local_rank, launch.world_size) == (5, 1, 8)
    assert launch.local_world_size == 4 and launch.num_nodes == 2


@pytest.mark.parametrize("env, local, nodes", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4, 2),  # torchrun
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2",
      "SLURM_LOCALID": "2", "SLURM_TASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "n1"}, 4, 2),  # srun
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2",
      "SLURM_LOCALID": "2", "MASTER_ADDR": "n1"}, 4, 2),  # srun, no per-node count: ntasks / nodes
    ({"RANK": "0", "WORLD_SIZE": "2"}, 2, 1),  # one node, nothing said: every rank here
])
def test_local_world_size_under_every_launcher(env, local, nodes):
    launch = read_launch_env(env)
    assert launch.local_world_size == local and launch.num_nodes == nodes


def test_pool_size():
    assert pool_size("world", 64) == 64
    assert pool_size("8", 64) == 8
    assert pool_size("8", 2) == 2  # a 2-rank test of an 8-rank preset pools its 2 ranks
    assert pool_size("local", 64) == 1
