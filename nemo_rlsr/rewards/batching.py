"""Length-sorted batches under a token budget, and padding.

Why: a reward step embeds thousands of responses whose lengths range from a few tokens
to the encoder's window. Fixed-size batches in arrival order pad every row to the
longest one in the batch (most of the compute then goes to padding), and a fixed
*sequence* count bounds memory only for the worst length. Sorting by length makes
rows in a batch nearly equal, and bounding padded tokens (rows x longest) keeps every
batch's activation memory the same whatever the length mix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["token_budget_batches", "pad"]


def token_budget_batches(lengths: Sequence[int], max_sequences: int, max_tokens: int) -> list[list[int]]:
    """Indices into ``lengths``, longest first, cut into batches of at most
    ``max_sequences`` rows and at most ``max_tokens`` padded tokens (rows x the batch's
    longest row). A row longer than ``max_tokens`` alone forms a batch of one."""
    if max_sequences < 1 or max_tokens < 1:
        raise ValueError(f"max_sequences and max_tokens must be >= 1, got {max_sequences}, {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            width = lengths[current[0]]  # the longest row: rows arrive longest first
            if len(current) < max_sequences and (len(current) + 1) * width <= max_tokens:
                current.append(i)
                continue
        batches.append([i])
    return batches


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape [len(rows), longest], padded on ``side``
    ("left" keeps every row's last real token in the last column, which last-token
    pooling of a causal encoder reads; "right" is what bidirectional encoders expect)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        if not row:
            continue
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[k, cols] = torch.as_tensor(row, dtype=torch.long)
        mask[k, cols] = 1
    return ids, mask
