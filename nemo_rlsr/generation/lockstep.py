"""Which ranks must sample in lockstep, and the torch sampler's two strategies: alone or in lockstep.

Under expert parallelism (or expert-TP wider than TP) an MoE layer exchanges tokens between ranks
that hold different prompts: megatron's dispatchers communicate over the expert-TP x EP group
(`allgather` all-gathers hidden states there and needs the same token count on every member;
`alltoall` uses its EP and expert-TP subgroups). So every rank of that group must run the same
forwards, with the same shapes, until all of them are done; a rank with fewer (or no) rows of its
own runs filler rows whose outputs are thrown away.

The decode loop (generation/torch_sampler.py) asks its strategy two things: `agree`, which sizes
to run (its own row counts and prompt length in, the ones to use out), and `fill`, which cache rows
to run (its own, up to the agreed count). `Alone` answers with the rank's own sizes and rows and
runs no collective; `Lockstep` with the group's maxima and filler rows.
"""

from __future__ import annotations

import torch


def lockstep_group():
    """The process group whose ranks must run the same forwards, or None when no MoE collective
    crosses prompts (no MoE layers, or the expert-TP x EP group lies inside the TP x CP group,
    whose ranks hold the same prompts and decide alike).

    The dense TP x CP peers of a rank must move with it too, so when the expert group neither lies
    inside nor contains the TP x CP group (e.g. TP=2, EP=3) the whole world steps together."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    expert = parallel_state.get_expert_tensor_and_model_parallel_group(check_initialized=False)
    if expert is None or expert.size() == 1:
        return None
    expert_ranks = set(dist.get_process_group_ranks(expert))
    dense_ranks = set(dist.get_process_group_ranks(parallel_state.get_tensor_and_context_parallel_group()))
    if expert_ranks <= dense_ranks:
        return None
    return expert if dense_ranks <= expert_ranks else dist.group.WORLD


class Alone:
    """No MoE collective crosses prompts: the rank runs its own sizes and rows, no collective."""

    def agree(self, sizes: list[int]) -> list[int]:
        return sizes

    def fill(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        return rows


class Lockstep:
    """The ranks of `group` run the same forwards with the same shapes."""

    def __init__(self, group, device: torch.device) -> None:
        self.group = group
        self.device = device  # where the backend reduces: the GPU for NCCL

    def agree(self, sizes: list[int]) -> list[int]:
        """Elementwise maximum of `sizes` over the group (one small all-reduce)."""
        import torch.distributed as dist

        tensor = torch.tensor(sizes, dtype=torch.long, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.tolist()

    def fill(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """`rows` followed by copies of index 0 up to `width` entries: filler rows that reuse an
        existing (cache) row, so their attention always sees valid keys; their outputs are never read."""
        return torch.cat([rows, rows.new_zeros(width - len(rows))])


def decode_strategy(device: torch.device) -> Alone | Lockstep:
    """`Lockstep` over `lockstep_group()` when this rank has one, else `Alone`."""
    group = lockstep_group()
    return Alone() if group is None else Lockstep(group, device)
