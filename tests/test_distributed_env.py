"""albef_ds.distributed.read_launch_env under each launcher's variables (no processes)."""
import pytest

from albef_ds.config import load_config
from albef_ds.distributed import read_launch_env


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
    def pool(world, *overrides):
        return load_config("tiny", ["train.micro_batch_size=2", *overrides], world_size=world).pool_size(world)
    assert pool(64) == 64  # "world"
    assert pool(64, "model.negative_pool=8") == 8
    assert pool(2, "model.negative_pool=8") == 2  # a 2-rank test of an 8-rank preset pools its 2 ranks
    assert pool(64, "model.negative_pool=1") == 1


def test_one_visible_gpu_per_task_is_device_0_whatever_the_local_rank():
    from albef_ds.distributed import cuda_device_for
    assert cuda_device_for(3, 1) == 0     # --gpus-per-task=1 / a site's GPU binding
    assert cuda_device_for(3, 8) == 3     # every GPU of the node visible
    with pytest.raises(RuntimeError, match="local rank 5 but 4 CUDA device"):
        cuda_device_for(5, 4)


def test_master_ports_of_concurrent_jobs_differ():
    """The batch scripts pick a free port on the first node at each start (the old formula
    10000 + (id % 1000) * 10 gave jobs 1234 and 2234 the same port)."""
    import socket

    from albef_ds.distributed import derived_port, free_port
    held = socket.socket()
    held.bind(("", free_port()))  # job 1234's rendezvous port, still in use
    held.listen()
    try:
        taken = held.getsockname()[1]
        assert free_port() != taken   # job 2234, started beside it on the same node
    finally:
        held.close()
    # The fallback without MASTER_PORT (plain srun): below the ephemeral range, from the job id.
    assert derived_port(1234) != derived_port(2234)
    assert all(1024 < derived_port(j) < 32768 for j in (0, 1234, 19999, 10**7 + 3))


def test_a_taken_master_port_says_so(monkeypatch):
    """The rendezvous of a port in use fails with a message that names the port."""
    import socket
    import subprocess
    import sys
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        code = ("from albef_ds.distributed import init_distributed; init_distributed('gloo')")
        env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
               "TORCHELASTIC_USE_AGENT_STORE": "False"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert proc.returncode != 0
    assert f"MASTER_PORT {port} on 127.0.0.1 is taken" in proc.stderr, proc.stderr[-2000:]


def test_a_picked_master_port_is_free_and_below_the_ephemeral_range():
    """Outgoing connections take their local ports from the kernel's ephemeral range: a
    MASTER_PORT picked there can be gone by the time rank 0 binds it."""
    import socket

    from albef_ds.distributed import _ephemeral_range, free_port
    low, _ = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < low, (port, low)
        with socket.socket() as s:
            s.bind(("", port))  # free indeed
