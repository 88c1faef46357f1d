"""Context parallelism (CP) on megatron's local layer spec: all-gather-KV attention.

megatron's local `DotProductAttention` refuses `context_parallel_size > 1`; only Transformer
Engine's attention does CP (ring p2p / all-to-all). Without TE, `ContextParallelAttention` does it
the simple way: every CP rank holds its share of the sequence (queries, keys, values, all
activations), all-gathers the keys and values of the whole sequence over the CP group for the
attention product, and attends its own queries to them. Everything outside attention is per token
and needs no communication; the all-gather's backward sums every rank's key/value gradients back
onto the rank that owns those positions. Per layer that costs one all-gather of K and V (2 x T x
kv heads x head dim) and a [T/CP, T] score block per head: activations shrink by CP, the attention
scores by CP, but every rank holds the whole K/V of the layer it is computing.

Layout: megatron's load-balanced one. The sequence is cut into 2 x CP equal chunks and CP rank r
holds chunks r and 2CP-1-r, so under the causal mask every rank has the same amount of work.
megatron's RoPE already slices its position table that way (`get_pos_emb_on_this_cp_rank`, used
whenever the CP group has more than one rank), so `cp_positions` must be, and is, the same order.

Masks: the policy gives the attention the rows of its [B, 1, T, T] boolean mask (True = masked:
future, pad and other-segment keys) that belong to this rank's queries, so padding and packed
segments work unchanged; a full [B, 1, T, T] mask is accepted too (its rows are picked here).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention

from nemo_rlsr.compat.megatron import forget_rotary_tables
from nemo_rlsr.models.spec import replace_module


def cp_positions(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Sequence positions held by CP rank `rank`, in its local order: chunks rank and 2cp-1-rank of
    the 2cp equal chunks of `length` (megatron's load-balanced split)."""
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2 x context_parallel = {2 * cp}")
    chunk = length // (2 * cp)
    starts = (rank * chunk, (2 * cp - 1 - rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def _cp_group_info() -> tuple[object, int, int]:
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    return group, dist.get_world_size(group), dist.get_rank(group)


def split_for_cp(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `tensor` along its sequence dimension `dim` (e.g. [B, T] ids)."""
    _, cp, rank = _cp_group_info()
    if cp == 1:
        return tensor
    return tensor.index_select(dim, cp_positions(tensor.shape[dim], cp, rank, tensor.device))


def _rank_major(length: int, cp: int, device) -> torch.Tensor:
    """Sequence positions in rank order: rank 0's, then rank 1's... (what an all-gather returns)."""
    return torch.cat([cp_positions(length, cp, r, device) for r in range(cp)])


def _all_gather_in_order(tensor: torch.Tensor, dim: int, group, cp: int) -> torch.Tensor:
    """Every CP rank's part of `tensor` (along `dim`), put back into sequence order."""
    parts = [torch.empty_like(tensor) for _ in range(cp)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    held = _rank_major(tensor.shape[dim] * cp, cp, tensor.device)
    return torch.cat(parts, dim=dim).index_select(dim, held.argsort())


def gather_from_cp(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The inverse of `split_for_cp` on every CP rank (per-token results such as logprobs); no grad."""
    group, cp, _ = _cp_group_info()
    if cp == 1:
        return tensor
    return _all_gather_in_order(tensor, dim, group, cp)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 0, megatron's [s, b, ...] layout) over the CP group.
    Backward: the gradient of each position is summed over the ranks that used it (all of them)
    and kept by the rank that owns it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, cp: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.cp, ctx.rank = group, cp, rank
        return _all_gather_in_order(tensor, 0, group, cp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        by_rank = grad.index_select(0, _rank_major(grad.shape[0], ctx.cp, grad.device))
        if dist.get_backend(ctx.group) == "gloo":  # no reduce-scatter there: all-reduce, keep this rank's rows
            dist.all_reduce(by_rank, group=ctx.group)
            return by_rank.chunk(ctx.cp)[ctx.rank], None, None, None
        mine = by_rank.new_empty((grad.shape[0] // ctx.cp, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, by_rank, group=ctx.group)
        return mine, None, None, None


class ContextParallelAttention(DotProductAttention):
    """megatron's local core attention, plus all-gather-KV context parallelism.

    Constructor and forward take megatron's `DotProductAttention` arguments unchanged (passed
    through, so megatron 0.16 and 0.19 both build it). With `config.context_parallel_size == 1`
    (also while `context_parallel_off` is active) it is exactly megatron's DotProductAttention; at
    CP > 1 it gathers the keys and values of the whole sequence and runs megatron's own attention
    math on this rank's query rows (GQA, softmax scale, and its softmax precision: fp32 for fp16/bf16
    configs with `attention_softmax_in_fp32`).
    """

    def __init__(self, config, *args, **kwargs) -> None:
        cp = config.context_parallel_size
        config.context_parallel_size = 1  # megatron's constructor refuses CP; nothing else it builds depends on it
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if self.config.context_parallel_size == 1:
            return super().forward(query, key, value, attention_mask, *args, **kwargs)
        group, cp, rank = _cp_group_info()
        local = query.shape[0]
        key = _GatherSequence.apply(key, group, cp, rank)
        value = _GatherSequence.apply(value, group, cp, rank)
        if attention_mask is None:  # megatron's causal default would be a [local, local] square
            attention_mask = torch.ones(local * cp, local * cp, dtype=torch.bool, device=query.device).triu(1)
            attention_mask = attention_mask[None, None]
        if attention_mask.shape[-2] == local * cp:  # a whole-sequence mask: this rank's query rows
            attention_mask = attention_mask.index_select(-2, cp_positions(local * cp, cp, rank, query.device))
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


def with_context_parallel_attention(spec):
    """`spec` (a local layer or block spec) with `ContextParallelAttention` wherever megatron's
    plain `DotProductAttention` is the core attention. A new spec tree; megatron's is left as is."""
    return replace_module(spec, DotProductAttention, ContextParallelAttention)


@contextmanager
def context_parallel_off(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` on whole sequences inside the block (the torch sampler's prefill and one-token
    decode steps cannot be split into 2 x CP chunks): every CP rank then computes the same thing
    with the same weights. Switches what megatron reads at forward time: `context_parallel_size` of
    every TransformerConfig held by the model (RoPE's length and our attention read it) and the CP
    group of the rotary embedding (which slices positions when its group has > 1 rank). Restored on
    exit, also on an exception; a no-op for a model built without CP. megatron memoises the rotary
    table per (module, length) without the group in the key, so that memo is emptied both ways (compat/megatron.py)."""
    configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
    configs = [c for c in configs.values() if getattr(c, "context_parallel_size", 1) > 1]
    rotaries = [m for m in module.modules()
                if hasattr(m, "inv_freq") and getattr(m, "cp_group", None) is not None and m.cp_group.size() > 1]
    saved = [(c, c.context_parallel_size) for c in configs], [(m, m.cp_group) for m in rotaries]
    for config in configs:
        config.context_parallel_size = 1
    for rotary in rotaries:
        rotary.cp_group = None
    forget_rotary_tables(rotaries)
    try:
        yield
    finally:
        for config, cp in saved[0]:
            config.context_parallel_size = cp
        for rotary, group in saved[1]:
            rotary.cp_group = group
        forget_rotary_tables(rotaries)
