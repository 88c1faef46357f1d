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


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    device: torch.device
    ep: int = 1  # expert parallelism: each rank holds num_moe_experts / ep experts of every MoE layer
    etp: int = 1  # tensor parallelism inside each expert
    # Uneven pipeline stages: layers of the first / last stage (None: an even split).
    stage_layers: tuple[int | None, int | None] = (None, None)
    # Interleaved pipeline: model chunks per PP rank (None: one chunk, the plain 1F1B schedule).
    vpp: int | None = None
    # Sequence parallelism: activations outside the TP regions split over TP by sequence (TP>1 only).
    sequence_parallel: bool = False
    # Context parallelism: each sequence split over `cp` ranks (models/context_parallel.py); `dp` excludes it.
    cp: int = 1

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 writes logs and plots (every rank computes the same reduced metrics)."""
        return self.rank == 0


def _free_port() -> int:
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


def init_distributed(
    tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600, ep: int = 1, etp: int = 1,
    stage_layers: tuple[int | None, int | None] = (None, None), vpp: int | None = None,
    sequence_parallel: bool = False, cp: int = 1,
) -> ParallelContext:
    """Create the default process group and megatron's TP/PP/DP (and expert EP/ETP) groups; seed
    every RNG.

    World size must be a multiple of tp*cp*pp; the rest is data parallelism (CP ranks of one DP
    rank see the same rows, each its part of every sequence). MoE layers regroup the
    same ranks as etp*ep*(expert DP)*pp, so it must be a multiple of etp*ep*pp too.
    """
    cpu_compat.enable()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            store=_rendezvous_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    world_size = dist.get_world_size()
    if world_size % (tp * cp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by tensor_parallel*context_parallel*"
                         f"pipeline_parallel = {tp}*{cp}*{pp}")
    if world_size % (etp * ep * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by expert_tensor_parallel*expert_parallel*"
            f"pipeline_parallel = {etp}*{ep}*{pp}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            # set here, megatron's get_forward_backward_func picks the interleaved schedule
            virtual_pipeline_model_parallel_size=vpp,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        ep=ep,
        etp=etp,
        stage_layers=stage_layers,
        vpp=vpp,
        sequence_parallel=sequence_parallel and tp > 1,
        cp=cp,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
