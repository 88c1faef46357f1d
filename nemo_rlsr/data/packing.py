"""Sequence packing for SFT: several (prompt + response) examples share one row of the model's length.

Short chat examples padded to the longest waste most of each row; packed, a step's examples fill few
rows. Each example keeps its own segment id, so the policy's attention is block-diagonal causal (no
token sees another example) and positions restart per example (`models/policy.py`): the per-token
logprobs, and so the loss, are those of the examples run one per row.
"""

from __future__ import annotations

import torch

from nemo_rlsr.models.policy import TokenBatch


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row: first-fit over the lengths, longest first (ties in input
    order, so the packing is deterministic). Every length must fit in `capacity`."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"an example of {max(too_long)} tokens does not fit a packed row of {capacity}")
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[index]), None)
        if row is None:
            bins.append([])
            free.append(capacity)
            row = len(bins) - 1
        bins[row].append(index)
        free[row] -= lengths[index]
    return bins


def packed_sft_batch(examples: list[tuple[list[int], int]], length: int, pad_id: int, rows_multiple: int) -> TokenBatch:
    """`examples` ((token ids, prompt length) each) packed into rows of `length`, with `segment_ids`
    (1, 2, ... per example in a row; 0 = pad) and the loss on each example's response tokens only.
    The row count is padded with empty rows up to a multiple of `rows_multiple` (the micro-batch size)."""
    bins = pack_bins([len(ids) for ids, _ in examples], length)
    rows = -(-len(bins) // rows_multiple) * rows_multiple
    ids = torch.full((rows, length), pad_id, dtype=torch.long)
    segments = torch.zeros(rows, length, dtype=torch.long)
    loss_mask = torch.zeros(rows, length)
    for row, members in enumerate(bins):
        offset = 0
        for segment, index in enumerate(members, start=1):
            tokens, prompt_len = examples[index]
            end = offset + len(tokens)
            ids[row, offset:end] = torch.tensor(tokens)
            segments[row, offset:end] = segment
            # targets[t] = ids[t + 1]: the response tokens of this example, never the next one's first token
            loss_mask[row, offset + prompt_len - 1 : end - 1] = 1.0
            offset = end
    return TokenBatch(ids, segments > 0, loss_mask, {}, segments)
