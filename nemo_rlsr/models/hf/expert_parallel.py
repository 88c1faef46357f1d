"""Expert parallelism in the HF <-> megatron conversion: which rank holds which expert, how sharded.

Under EP each rank's MoE layer holds `num_local = num_moe_experts / ep` experts, numbered 0.. in
its module: local expert i of EP rank r is global expert `r * num_local + i` (megatron's own
numbering, `local_expert_indices_offset`). Adapters see global indices only; the loader maps a
rank's names to global ones, the saver gathers every EP rank's experts.

Expert weights are split over the expert-TP group (ETP, `expert_tensor_parallel`), not the
attention TP group: with ETP=1 and TP=2 each expert is whole on every rank that holds it, even
though its linear layers carry megatron's `tensor_model_parallel` attribute.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def is_expert(name: str) -> bool:
    """A routed expert's parameter (shared experts are plain TP-sharded MLPs)."""
    return _LOCAL_EXPERT.match(name) is not None


def global_expert_name(name: str, ep_rank: int, num_local: int) -> str:
    """`...local_experts.{i}...` of EP rank `ep_rank` -> `...local_experts.{global index}...`."""
    match = _LOCAL_EXPERT.match(name)
    if match is None:
        return name
    return f"{match[1]}{ep_rank * num_local + int(match[2])}{match[3]}"


def ep_size_and_rank() -> tuple[int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_rank())


def shard_group(name: str):
    """The process group that splits parameter `name`: expert TP for routed experts, TP else."""
    from megatron.core import parallel_state

    if is_expert(name):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def shard_group_size_and_rank(name: str) -> tuple[int, int]:
    group = shard_group(name)
    return dist.get_world_size(group), dist.get_rank(group)


def expert_peers(name: str, ep: int, ep_rank: int, num_local: int) -> list[str]:
    """Global names of this rank's expert slot `name` on EP ranks 0..ep-1 (just `name` otherwise)."""
    match = _LOCAL_EXPERT.match(name)
    if ep == 1 or match is None:
        return [name]
    local = int(match[2]) - ep_rank * num_local
    return [f"{match[1]}{rank * num_local + local}{match[3]}" for rank in range(ep)]


def gather_experts(name: str, tensor: torch.Tensor, num_local: int) -> dict[str, torch.Tensor]:
    """{global name: tensor} of the same local expert slot on every EP rank.

    `name` is this rank's global name of a routed expert's (full, expert-TP-gathered) tensor; every
    EP rank calls this for the same slot in the same order (their modules have the same layout),
    so one all-gather over the EP group brings expert `name`'s peers r*num_local + i, r = 0..ep-1.
    Anything else comes back as it is."""
    ep, ep_rank = ep_size_and_rank()
    names = expert_peers(name, ep, ep_rank, num_local)
    if len(names) == 1:
        return {name: tensor}
    from megatron.core import parallel_state

    parts = [torch.empty_like(tensor) for _ in range(ep)]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_expert_model_parallel_group())
    return dict(zip(names, parts))
