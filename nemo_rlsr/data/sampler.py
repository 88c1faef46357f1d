"""Deterministic, resumable prompt sampler, sharded over data-parallel ranks.

Every rank builds the same per-epoch permutation from ``seed + epoch`` (no communication needed) and
takes its own contiguous slice of each global batch, so the DP shards of a step are disjoint. The state
is two integers (epoch, position), so a checkpoint resumes mid-epoch on exactly the same batches.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_rlsr.data.instructions import DatasetError


class PromptSampler:
    """Yields this rank's example indices, one global batch (``batch_size_per_rank * dp_size``) at a time.

    Epoch ``e`` is a permutation of ``range(num_examples)`` drawn from
    ``torch.Generator().manual_seed(seed + e)`` (the identity when ``shuffle=False``). When fewer than a
    global batch of indices remain in an epoch, that tail is dropped (``dropped_tail_per_epoch`` of them)
    and the next epoch starts: every step then has a full, equal-sized batch on every rank, which GRPO's
    token-mean over the global batch and the rollout engine's fixed batch shapes rely on. The dropped
    indices differ per epoch because the permutation does, so no example is starved for long.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size_per_rank: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if batch_size_per_rank < 1 or dp_size < 1:
            raise ValueError(f"batch_size_per_rank ({batch_size_per_rank}) and dp_size ({dp_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        global_batch = batch_size_per_rank * dp_size
        if num_examples < global_batch:
            raise DatasetError(
                f"num_examples ({num_examples}) < global batch ({batch_size_per_rank} per rank x {dp_size} "
                f"DP ranks = {global_batch}): not even one batch per epoch"
            )
        self.num_examples = num_examples
        self.batch_size_per_rank = batch_size_per_rank
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into the epoch's permutation where the next global batch starts
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def global_batch_size(self) -> int:
        return self.batch_size_per_rank * self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def dropped_tail_per_epoch(self) -> int:
        """Indices left out at the end of every epoch (fewer than one global batch)."""
        return self.num_examples % self.global_batch_size

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + self.epoch)
                self._perm = torch.randperm(self.num_examples, generator=gen).tolist()
            else:
                self._perm = list(range(self.num_examples))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> list[int]:
        """This rank's indices for the next step (advances the state by one global batch)."""
        g = self.global_batch_size
        start = self.position + self.dp_rank * self.batch_size_per_rank
        batch = self._permutation()[start : start + self.batch_size_per_rank]
        self.position += g
        if self.position + g > self.num_examples:  # roll over now, so a saved state is always a batch start
            self.epoch += 1
            self.position = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "dp_size": self.dp_size,
            "batch_size_per_rank": self.batch_size_per_rank,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; refuses a state whose order would mean something else here."""
        for key in ("num_examples", "seed", "dp_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}")
        for key in ("num_examples", "seed", "dp_size"):
            if key not in state:
                raise ValueError(f"sampler state lacks {key!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_examples - self.global_batch_size:
            raise ValueError(f"sampler state epoch={epoch} position={position} is out of range")
        self.epoch, self.position = epoch, position
