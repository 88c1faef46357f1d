"""One score per data-parallel replica: the ranks that hold the same rollouts score them once.

Every tensor-, pipeline- and context-parallel rank of one data-parallel replica samples the same
rollouts (the trainer seeds them alike, generation/torch_sampler.py). Scoring them on each of those
ranks would embed every response TP x PP x CP times, and with ``reward.backend: ray`` or ``openai``
send that many requests to a shared service. So the replica's lowest global rank scores, and the
RewardResult's tensors go to the other ranks of the replica in one broadcast, on the policy's
device (NCCL moves device tensors only, as ``rollout_metrics.gather_over_dp`` does).

The replica group is built from every rank's data-parallel rank (one all_gather at start-up), so it
is right whatever order megatron lays TP, CP, PP and DP out in. ``scored_rows`` counts what the
scorers scored, summed over the world: the step's rollout count, not a multiple of it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .result import RewardResult

__all__ = ["ReplicaScoring"]

# RewardResult fields packed into one float64 tensor for the broadcast: float32 and int64 values
# below 2^53 and bools are exact in float64, and each field comes back in its own dtype.
_FIELDS = [f.name for f in dataclasses.fields(RewardResult)]


class ReplicaScoring:
    """Which rank of this rank's data-parallel replica scores, and how the others get its result."""

    def __init__(self, dp_rank: int, device: torch.device) -> None:
        self.device = device
        self.group = None
        self.scorer = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
            dist.all_gather(ranks, torch.tensor([dp_rank], device=device))
            replica_of = [int(r) for r in ranks]
            # new_group is collective over the world: every rank creates every replica's group, in order
            for replica in sorted(set(replica_of)):
                members = [rank for rank, r in enumerate(replica_of) if r == replica]
                group = dist.new_group(members) if len(members) > 1 else None
                if replica == dp_rank:
                    self.group, self.scorer = group, members[0]

    @property
    def is_scorer(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == self.scorer

    def share(self, result: RewardResult | None, rows: int) -> RewardResult:
        """The scorer's `result` (None on the other ranks) on every rank of the replica, on the CPU
        like every RewardResult; `rows` is the rollout count, known on every rank."""
        if self.group is None:
            assert result is not None
            return result
        packed = torch.zeros(len(_FIELDS), rows, dtype=torch.float64, device=self.device)
        if self.is_scorer:
            packed.copy_(torch.stack([getattr(result, name).to(torch.float64) for name in _FIELDS]))
        dist.broadcast(packed, src=self.scorer, group=self.group)
        if self.is_scorer:
            return result
        dtypes = {name: getattr(RewardResult.empty_batch(), name).dtype for name in _FIELDS}
        packed = packed.cpu()
        return RewardResult(**{name: packed[i].to(dtypes[name]) for i, name in enumerate(_FIELDS)})

    def scored_rows(self, local: int) -> int:
        """Rollouts scored this step over every rank: each rank's `local` count (its rows if it is a
        scorer, else 0), summed over the world (a collective: every rank calls it)."""
        count = torch.tensor([local], dtype=torch.long, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
        return int(count)
