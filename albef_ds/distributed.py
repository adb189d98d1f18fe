"""The launch environment and cross-rank collectives: the only module that reads them.

Launchers disagree on what they tell a process. The ``deepspeed`` launcher and
``torchrun`` set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; plain
``srun`` sets only SLURM_* variables, which ``deepspeed.init_distributed`` does not read
(it would try MPI discovery); plain ``python`` sets nothing. :func:`read_launch_env`
maps all of them onto the torch variables, plus LOCAL_WORLD_SIZE, which
mosaicml-streaming needs to know how many ranks share a node.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist


@dataclass
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed/torchrun", "srun" or "python"

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # A simple list "n1,n2" or a single host: good enough without scontrol.
    return nodelist.split(",")[0].split("[")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", world)))
        return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                         local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)), "deepspeed/torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or max(1, world // nodes))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # A port derived from the job id: the same on every rank without talking.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world,
                         local_world, addr, port, "srun")
    return LaunchEnv(0, 0, 1, 1, "127.0.0.1", _free_port(), "python")


def export_env(launch: LaunchEnv) -> None:
    """Write the torch (and streaming) variables so every library sees the same world."""
    os.environ.update({
        "RANK": str(launch.rank), "LOCAL_RANK": str(launch.local_rank),
        "WORLD_SIZE": str(launch.world_size), "LOCAL_WORLD_SIZE": str(launch.local_world_size),
        "MASTER_ADDR": launch.master_addr, "MASTER_PORT": str(launch.master_port),
    })


def init_distributed(backend: str = "auto") -> LaunchEnv:
    """Read the launch environment, export it, and start the process group (DeepSpeed's
    communication layer, which also serves torch.distributed)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launch = read_launch_env()
    export_env(launch)
    if backend == "auto":
        backend = get_accelerator().communication_backend_name()
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return launch


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    name = get_accelerator().device_name()
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in one process); CPU tensors travel through the backend's
    device (NCCL reduces only GPU tensors) and come back on the CPU."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    home = tensor.device
    tensor = tensor.to(device()).contiguous()
    dist.all_reduce(tensor)
    return tensor.to(home)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class TorchGather:
    """The model's view of other ranks (see albef_ds.gather) over torch.distributed."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        # Autograd-aware: backward hands each rank the sum, over every rank's loss, of the
        # gradients for its own slice. With data-parallel gradient averaging on top, that is
        # exactly the gradient of the mean of the ranks' losses (tests/train checks it).
        import warnings

        from torch.distributed.nn.functional import all_gather
        with warnings.catch_warnings():  # deprecated in favour of a private API: keep the public one
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(tensor.contiguous(), group=self.group))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor


def make_gather():
    """TorchGather when a process group of several ranks runs, else the identity."""
    from .gather import SINGLE_PROCESS
    if dist.is_initialized() and dist.get_world_size() > 1:
        return TorchGather()
    return SINGLE_PROCESS
