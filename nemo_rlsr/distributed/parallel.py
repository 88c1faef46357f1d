"""Process groups and megatron parallel state, the same way on one CPU and on a GPU cluster.

Launch with plain `python` (one process) or `torchrun` / `srun` (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment). CUDA machines use NCCL; CPU machines use gloo with
the CPU compatibility layer switched on, so megatron-core's own code runs in both cases.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_rlsr.distributed import cpu_compat
from nemo_rlsr.distributed.dims import ParallelDims


@dataclass(frozen=True, kw_only=True)
class ParallelContext(ParallelDims):
    """The run's parallel split (distributed/dims.py) as this process has joined it: what
    `init_distributed` returns, and what the policy, the samplers and the trainers read."""

    rank: int
    world_size: int
    dp: int  # data-parallel size (excludes CP: the CP ranks of one DP rank see the same rows)
    dp_rank: int
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 writes logs and plots (every rank computes the same reduced metrics)."""
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_STORE: dist.Store | None = None
_GENERATION = 0


def _rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The env:// rendezvous store, under a fresh key prefix for each init in this process.

    Re-initialising after `destroy_distributed()` (e.g. to change TP/PP in one job) through a
    plain env:// init reuses the same keys: peers read the previous group's stale gloo addresses
    ("Gloo connectFullMesh failed ... Connection refused"). So the store made by the first init is
    kept for the life of the process and every init gets its own namespace in it.
    """
    global _STORE, _GENERATION
    if _STORE is None:
        _STORE, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    _GENERATION += 1
    return dist.PrefixStore(f"nemo_rlsr_init_{_GENERATION}", _STORE)


def init_distributed(dims: ParallelDims = ParallelDims()) -> ParallelContext:
    """Create the default process group and megatron's TP/CP/PP/DP (and expert EP/ETP) groups for
    `dims`; seed every RNG from `dims.seed`.

    The world size must satisfy the split's rules (`ParallelDims.problems`: a multiple of tp*cp*pp,
    the rest being data parallelism, and of etp*ep*pp, how MoE layers regroup the same ranks);
    ConfigError otherwise, before megatron's groups exist.
    """
    cpu_compat.enable()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=dims.timeout_s)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            store=_rendezvous_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    world_size = dist.get_world_size()
    dims.validate(world_size)
    if not parallel_state.model_parallel_is_initialized():
        # vpp set here: megatron's get_forward_backward_func then picks the interleaved schedule
        parallel_state.initialize_model_parallel(**dims.megatron_sizes())
    torch.manual_seed(dims.seed)
    model_parallel_cuda_manual_seed(dims.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelContext(
        **dims.dims_fields(),
        rank=dist.get_rank(),
        world_size=world_size,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
