"""THD layout: a micro-batch's valid tokens as one unpadded stream of sequences (`cu_seqlens`).

Why: with an explicit [B, 1, T, T] mask (left-padded rollouts, packed SFT rows) Transformer Engine's
attention must run `attn_mask_type=arbitrary`, which only its unfused backend serves: the whole
score matrix per layer, no flash / cuDNN fused attention, no TE context parallelism. In the THD
layout the same attention pattern is given by the sequence boundaries alone: every row's valid
tokens are laid end to end (pads dropped), one sequence per row, or per segment of a packed row
(`TokenBatch.segment_ids`), and TE runs `padding_causal` attention over `cu_seqlens` with its
flash / fused kernels (megatron's `PackedSeqParams`, qkv_format "thd").

megatron-core's local `DotProductAttention` refuses `packed_seq_params` (core_v0.16.1
megatron/core/transformer/dot_product_attention.py asserts it is None), so on the local spec the
stream's `cu_seqlens` are turned back into the block-causal mask (`block_causal_mask`): the same
stream, the same positions, megatron's own attention math. That is what the CPU tests run.

Choices:
* Stream order: row by row, left to right; a sequence is a run of valid tokens of one row with one
  segment id. Its valid tokens must be contiguous (true of left / right padding and of
  data/packing.py's rows); a pad inside a sequence is refused, because the mask path would count it
  in the positions and THD cannot.
* Positions restart at 0 per sequence: what `policy.position_ids` gives a packed row, and, for a
  left-padded row, its positions minus the pad count (RoPE sees only offsets: the same logits up to
  rounding).
* Alignment: the stream is padded at its end to a multiple of `multiple` (FP8 GEMMs, sequence
  parallelism: models/precision.sequence_multiple). The pad belongs to the last sequence's padded
  extent: `cu_seqlens_padded` = `cu_seqlens` except its last entry, the stream length. That is TE's
  own example of padded THD (TransformerEngine v2.9,
  transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py, forward's
  docstring: [a a a 1 b b 2 2 c c c c 3] -> cu_seqlens [0, 3, 5, 9], padded [0, 4, 8, 13]), and
  TE decides `pad_between_seqs` from all entries but the last, so flash attention stays eligible.
  TE's context parallelism would need every sequence padded to 2 x CP (cu_seqlens_padded between
  sequences); that is not built: THD with context parallelism is refused (config/rules.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ThdStream:
    """Where a [B, T] micro-batch's valid tokens sit in a [1, length] stream, and its sequences."""

    index: torch.Tensor  # [N] flat positions (row * T + column) of the valid tokens, in stream order
    cu_seqlens: torch.Tensor  # [S + 1] int32: sequence starts in the stream, then N
    cu_seqlens_padded: torch.Tensor  # [S + 1] int32: cu_seqlens with the last entry `length`
    positions: torch.Tensor  # [1, length] position of each stream token within its sequence
    max_seqlen: int  # longest padded extent (TE sizes its kernels with it)
    shape: tuple[int, int]  # the micro-batch's (B, T)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, length, ...]: the valid tokens in stream order, zeros in the end pad."""
        flat = tensor.reshape(-1, *tensor.shape[2:])[self.index]
        return torch.nn.functional.pad(flat, (0, 0) * (tensor.dim() - 2) + (0, self.length - len(self.index)))[None]

    def scatter(self, stream: torch.Tensor) -> torch.Tensor:
        """[1, length, ...] -> [B, T, ...]: each stream token back in its row and column, zeros at pads
        (differentiable: the gradient reaches the stream tokens it came from)."""
        rows, width = self.shape
        flat = stream.new_zeros((rows * width, *stream.shape[2:]))
        flat = flat.index_copy(0, self.index, stream[0, : len(self.index)])
        return flat.reshape(rows, width, *stream.shape[2:])

    def attention_inputs(self, te_spec: bool) -> dict:
        """GPTModel's attention arguments for this stream: PackedSeqParams for Transformer Engine's
        attention; the block-causal mask for megatron's local one, which refuses PackedSeqParams."""
        if te_spec:
            return {"attention_mask": None, "packed_seq_params": self.packed_seq_params()}
        return {"attention_mask": block_causal_mask(self.cu_seqlens_padded, self.length)}

    def packed_seq_params(self):
        """megatron's PackedSeqParams for Transformer Engine's THD attention (self-attention: the
        same boundaries for queries and keys)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def thd_stream(valid: torch.Tensor, segment_ids: torch.Tensor | None = None, multiple: int = 1,
               length: int | None = None) -> ThdStream:
    """The THD layout of a [B, T] batch's `valid` tokens (and packed rows' `segment_ids`), the stream
    padded at its end to a multiple of `multiple` (at least one token), or to `length` if longer."""
    rows, width = valid.shape
    index = valid.reshape(-1).bool().nonzero().squeeze(1)
    count = len(index)
    row, column = index // width, index % width
    segment = segment_ids.reshape(-1)[index] if segment_ids is not None else torch.zeros_like(index)
    starts = torch.ones(count, dtype=torch.bool, device=valid.device)
    starts[1:] = (row[1:] != row[:-1]) | (segment[1:] != segment[:-1])
    gaps = ~starts[1:] & (column[1:] != column[:-1] + 1)
    if gaps.any():
        at = int(gaps.nonzero()[0]) + 1
        raise ValueError(f"row {int(row[at])}: a pad inside a sequence before column {int(column[at])}; the THD "
                         f"layout needs each sequence's valid tokens contiguous (use model.attention_layout=mask)")
    first = starts.nonzero().squeeze(1) if count else index.new_zeros(1)  # no token: one empty sequence
    length = max(-(-count // multiple) * multiple, multiple, length or 0)
    cu_seqlens = torch.cat([first, first.new_tensor([count])]).to(torch.int32)
    cu_seqlens_padded = cu_seqlens.clone()
    cu_seqlens_padded[-1] = length
    stream = torch.arange(length, device=valid.device)
    # each token's offset from the start of its (padded) sequence; the end pad continues the last one
    owner = torch.searchsorted(cu_seqlens_padded[1:-1].long(), stream, right=True)
    positions = stream - cu_seqlens_padded.long()[owner]
    extents = cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]
    return ThdStream(index, cu_seqlens, cu_seqlens_padded, positions[None], int(extents.max()), (rows, width))


def thd_streams(batches: list, multiple: int, group=None) -> list[ThdStream]:
    """The streams of a step's micro-batches (TokenBatches). With a `group` (ranks whose MoE layers
    exchange tokens, generation/lockstep.py) each is padded to the longest of its index over the
    group: those ranks' collectives need the same shapes, as microbatches.agree_across_ranks gives
    the [B, T] micro-batches."""
    streams = [thd_stream(b.valid, b.segment_ids, multiple) for b in batches]
    if group is None:
        return streams
    import torch.distributed as dist

    lengths = torch.tensor([s.length for s in streams], device=batches[0].valid.device)
    dist.all_reduce(lengths, op=dist.ReduceOp.MAX, group=group)
    return [thd_stream(b.valid, b.segment_ids, multiple, n) for b, n in zip(batches, lengths.tolist())]


def block_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """The [1, 1, length, length] boolean mask (True = not attended) of a THD stream: causal inside
    each sequence of `cu_seqlens` (use the padded ones: the end pad attends within the last
    sequence's extent and no real token sees it), nothing across sequences. What the local spec's
    attention takes in place of PackedSeqParams."""
    stream = torch.arange(length, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:-1].long(), stream, right=True)
    other = sequence[:, None] != sequence[None, :]
    future = stream[None, :] > stream[:, None]
    return (other | future)[None, None]
