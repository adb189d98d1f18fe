"""The launch environment and cross-rank collectives: the only module that reads them.

Launchers disagree on what they tell a process. The ``deepspeed`` launcher and
``torchrun`` set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; plain
``srun`` sets only SLURM_* variables, which neither torch nor ``deepspeed.init_distributed``
reads (DeepSpeed would try MPI discovery); plain ``python`` sets nothing. :func:`read_launch_env`
maps all of them onto the torch variables, plus LOCAL_WORLD_SIZE, which
mosaicml-streaming needs to know how many ranks share a node.
"""
from __future__ import annotations

import datetime
import errno
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


def free_port() -> int:
    """A TCP port free on every interface of this host now (the batch scripts pick
    MASTER_PORT with it on the first node), below the kernel's ephemeral range: a port from
    that range (what binding port 0 gives) can be taken by any outgoing connection in the
    seconds before rank 0 binds it (seen: two jobs on one node, EADDRINUSE 7 s later)."""
    import random
    low, _ = _ephemeral_range()
    below = range(max(1024, low - 20000), low)
    for port in random.SystemRandom().sample(below, min(200, len(below))):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: any free port
        s.bind(("", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


#: without MASTER_PORT (plain ``srun albef-ds ...``, no batch script to pick a free port),
#: every rank derives the port from the job id: below the Linux ephemeral range (32768+),
#: the same on every rank; two jobs whose ids differ by a multiple of the span collide.
DERIVED_PORT_BASE, DERIVED_PORT_SPAN = 12000, 20000


def derived_port(job_id: int) -> int:
    return DERIVED_PORT_BASE + job_id % DERIVED_PORT_SPAN


def cuda_device_for(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: its local rank among the node's visible GPUs, or device 0
    when each task sees exactly one (sites that bind one GPU per task set
    CUDA_VISIBLE_DEVICES per task, so local rank 3 sees a single device 0)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} but {visible} CUDA device(s) visible to this task "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                       f"one GPU per rank, either all of the node's or exactly one per task")


def _local_world_size(env: Mapping[str, str], world: int) -> int:
    """Ranks on this node. torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    (on every node of a multi-node job), srun SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE
    ("4(x2)"); with none of them every rank is taken to be on this node."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(name, "").split("(")[0].split(",")[0]
        if value:
            return int(value)
    return world


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                         _local_world_size(env, world), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)), "deepspeed/torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
        local_world = _local_world_size(env, max(1, world // nodes))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT") or derived_port(int(env.get("SLURM_JOB_ID", 0))))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world,
                         local_world, addr, port, "srun")
    return LaunchEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "python")


def export_env(launch: LaunchEnv) -> None:
    """Write the torch (and streaming) variables so every library sees the same world."""
    os.environ.update({
        "RANK": str(launch.rank), "LOCAL_RANK": str(launch.local_rank),
        "WORLD_SIZE": str(launch.world_size), "LOCAL_WORLD_SIZE": str(launch.local_world_size),
        "MASTER_ADDR": launch.master_addr, "MASTER_PORT": str(launch.master_port),
    })


#: a collective's timeout: DeepSpeed's default, which started the group before engines
#: existed (torch's own default for NCCL is 10 minutes)
PG_TIMEOUT = datetime.timedelta(minutes=30)


def init_distributed(backend: str = "auto") -> LaunchEnv:
    """Read the launch environment, export it, and start torch's process group ("auto":
    nccl on CUDA, gloo on CPU). Every engine wraps this group (DeepSpeed's communication
    layer adopts it at ``deepspeed.initialize``); no engine library is needed to start it."""
    launch = read_launch_env()
    export_env(launch)
    on_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(cuda_device_for(launch.local_rank, torch.cuda.device_count()))
    if not dist.is_initialized():
        _refuse_a_taken_port(launch)
        try:
            dist.init_process_group(backend=backend, init_method="env://", timeout=PG_TIMEOUT)
        except (RuntimeError, OSError) as e:
            if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
                raise _port_taken_error(launch) from e
            raise
    return launch


def _port_taken_error(launch: LaunchEnv) -> RuntimeError:
    return RuntimeError(
        f"rank {launch.rank}: MASTER_PORT {launch.master_port} on {launch.master_addr} is taken "
        f"(another job on that node?): set MASTER_PORT to a free port, or submit through "
        f"slurm/pretrain.sbatch, which picks one")


def _refuse_a_taken_port(launch: LaunchEnv) -> None:
    """Rank 0 binds the rendezvous port itself unless torchrun's agent already holds the store
    there; when the port is taken, torch retries binding for about 30 s before it fails. Trying
    the bind first (with the same SO_REUSEADDR as torch's store) gives the same refusal at once."""
    if launch.rank != 0 or launch.world_size < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    try:
        infos = socket.getaddrinfo(launch.master_addr, launch.master_port, type=socket.SOCK_STREAM)
    except OSError:  # an unresolvable address: torch says so in its own words
        return
    family, _, _, _, address = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise _port_taken_error(launch) from e
    finally:
        probe.close()


def device() -> torch.device:
    """This rank's device: its CUDA device where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in one process); CPU tensors travel through the backend's
    device (NCCL reduces only GPU tensors) and come back on the CPU."""
    if not _several():
        return tensor
    home = tensor.device
    tensor = tensor.to(device()).contiguous()
    dist.all_reduce(tensor)
    world = dist.get_world_size()
    TRAFFIC.add("eval_sum", 2 * (world - 1) / world * _nbytes(tensor))
    return tensor.to(home)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _several() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (itself in one process)."""
    if not _several():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order ([obj] in one process)."""
    if not _several():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Traffic:
    """Bytes this rank RECEIVES through the collectives albef-ds itself issues (feature
    gathers, the negatives exchange, evaluation sums), by kind. A ring all-gather of n bytes
    per rank receives (G - 1) n; an all-to-all the rows other ranks send; a ring all-reduce
    2 (G - 1) / G n. DeepSpeed's own gradient and parameter traffic is not counted here."""

    def __init__(self):
        self.bytes: dict[str, float] = {}

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0.0) + float(nbytes)

    def take(self) -> dict[str, float]:
        """The counts since the last call, and reset."""
        out, self.bytes = self.bytes, {}
        return out


#: every collective of this module records into it (read per log interval by the trainer).
TRAFFIC = Traffic()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _RowExchange(torch.autograd.Function):
    """Rows of the owners' local tensors to the ranks that drew them, and their gradients
    back: forward, owner o sends ``tensor[send_rows]`` split by requester; backward, each
    requester returns the gradient of the rows it got, and the owner adds them up at
    ``send_rows`` (a row drawn by several ranks, or twice, gets the sum)."""

    @staticmethod
    def forward(ctx, tensor, send_rows, send_counts, recv_counts, group, kind):
        ctx.save_for_backward(send_rows)
        ctx.meta = (tensor.shape[0], send_counts, recv_counts, group, kind)
        payload = tensor.index_select(0, send_rows).contiguous()
        out = tensor.new_empty((sum(recv_counts),) + tuple(tensor.shape[1:]))
        dist.all_to_all_single(out, payload, recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        (send_rows,) = ctx.saved_tensors
        rows, send_counts, recv_counts, group, kind = ctx.meta
        grad = grad.contiguous()
        back = grad.new_empty((sum(send_counts),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad, send_counts, recv_counts, group=group)
        me = dist.get_rank(group)
        row_bytes = back[0].numel() * back.element_size() if back.shape[0] else 0
        TRAFFIC.add(kind + "_backward", row_bytes * (sum(send_counts) - send_counts[me]))
        out = grad.new_zeros((rows,) + tuple(grad.shape[1:]))
        out.index_add_(0, send_rows, back)
        return out, None, None, None, None, None


class TorchGather:
    """The model's view of the other ranks of its pool (see albef_ds.gather) over
    torch.distributed. ``group``: the pool's process group (None: every rank)."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, tensor: torch.Tensor, kind: str = "feature_gather") -> torch.Tensor:
        tensor = tensor.detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        TRAFFIC.add(kind, (self.world_size - 1) * _nbytes(tensor))
        return torch.cat(parts)

    def gather_with_grad(self, tensor: torch.Tensor, kind: str = "negatives_full_gather") -> torch.Tensor:
        # Autograd-aware: backward hands each rank the sum, over every rank's loss, of the
        # gradients for its own slice. With data-parallel gradient averaging on top, that is
        # exactly the gradient of the mean of the ranks' losses (tests/train checks it).
        import warnings

        from torch.distributed.nn.functional import all_gather
        with warnings.catch_warnings():  # deprecated in favour of a private API: keep the public one
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(tensor.contiguous(), group=self.group)
        # forward all-gather, backward reduce-scatter of the same buffer
        TRAFFIC.add(kind, (self.world_size - 1) * _nbytes(tensor))
        TRAFFIC.add(kind + "_backward", (self.world_size - 1) * _nbytes(tensor))
        return torch.cat(parts)

    def select_rows(self, tensor: torch.Tensor, index: torch.Tensor,
                    kind: str = "negatives_exchange") -> torch.Tensor:
        """``gather(tensor)[index]`` without gathering: ``index`` [N] holds rows of the pool's
        concatenated batch (every rank holds ``tensor.shape[0]`` rows); only those rows move,
        from their owners, with gradient back to the owners when ``tensor`` requires one.
        Bytes per rank: N rows each way, whatever the pool size."""
        rows = tensor.shape[0]
        owner = torch.div(index, rows, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)  # requests grouped by owner rank
        wanted = (index - owner * rows)[order]
        recv = torch.bincount(owner, minlength=self.world_size)
        send = torch.empty_like(recv)
        dist.all_to_all_single(send, recv, group=self.group)  # how many rows each rank wants of mine
        # Split sizes are Python ints for every backend: one host sync per exchange.
        recv_counts, send_counts = recv.tolist(), send.tolist()
        send_rows = wanted.new_empty(sum(send_counts))
        dist.all_to_all_single(send_rows, wanted.contiguous(), send_counts, recv_counts, group=self.group)
        me = self.rank
        TRAFFIC.add(kind + "_plan", _nbytes(recv) * (self.world_size - 1) / self.world_size
                    + wanted.element_size() * (sum(send_counts) - send_counts[me]))
        got = _RowExchange.apply(tensor, send_rows, send_counts, recv_counts, self.group, kind)
        row_bytes = _nbytes(tensor) // max(rows, 1)
        TRAFFIC.add(kind, row_bytes * (sum(recv_counts) - recv_counts[me]))
        # Back from owner order to the order of ``index``.
        return got.index_select(0, torch.argsort(order))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=self.group)
        TRAFFIC.add("sum", 2 * (self.world_size - 1) / self.world_size * _nbytes(tensor))
        return tensor


def make_pool_gather(size: Optional[int] = None):
    """The gather of this rank's negatives pool of ``size`` consecutive ranks (None: every
    rank; ``Config.pool_size`` says how many), so a pool fills a node before it spans two:
    every launcher numbers a node's ranks consecutively. The identity in one process or a
    1-rank pool."""
    from .gather import SINGLE_PROCESS
    if not _several():
        return SINGLE_PROCESS
    world = dist.get_world_size()
    size = world if size is None else size
    if size == 1:
        return SINGLE_PROCESS
    if size == world:
        return TorchGather()
    group, _ = dist.new_subgroups(group_size=size)  # collective: every rank creates every group
    return TorchGather(group)


def make_gather():
    """TorchGather over every rank when a process group of several ranks runs, else the identity."""
    return make_pool_gather()
