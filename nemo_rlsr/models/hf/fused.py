"""Megatron's fused layouts <-> HF's separate tensors (shared by every adapter).

* `linear_qkv` fuses Q, K and V *per query group*: rows are [q heads of group 0, k_0, v_0,
  q heads of group 1, k_1, v_1, ...], each block `head_dim` rows (biases likewise). TP shards the
  rows contiguously, so each rank holds whole groups.
* `linear_fc1` under a gated linear unit is [gate; up] (silu(gate) * up) on the full tensor, but
  each TP rank holds [gate_shard; up_shard]: `glu_shard` / `glu_unshard` convert between the two.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """HF q/k/v ([heads*d, ...], [groups*d, ...], [groups*d, ...]; weights or biases) -> megatron qkv."""
    tail = q.shape[1:]
    q = q.reshape(groups, -1, head_dim, *tail)
    k = k.reshape(groups, 1, head_dim, *tail)
    v = v.reshape(groups, 1, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of `fuse_qkv`: megatron's per-group interleave -> (q, k, v), each contiguous."""
    tail = qkv.shape[1:]
    per_group = heads // groups
    blocks = qkv.reshape(groups, per_group + 2, head_dim, *tail)
    q = blocks[:, :per_group].reshape(heads * head_dim, *tail)
    k = blocks[:, per_group].reshape(groups * head_dim, *tail)
    v = blocks[:, per_group + 1].reshape(groups * head_dim, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_glu(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def glu_shard(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's rows of a full [gate; up] fc1: [gate_shard; up_shard]."""
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def glu_unshard(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `glu_shard` over all TP ranks' shards (in rank order)."""
    halves = [shard.chunk(2, dim=0) for shard in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def is_glu_fc1(megatron_name: str) -> bool:
    """fc1 weights/biases of dense, shared-expert and expert MLPs (all gated in our architectures);
    TE's fused `linear_fc1.layer_norm_weight` is not part of the GLU."""
    return ".linear_fc1.weight" in megatron_name or ".linear_fc1.bias" in megatron_name
