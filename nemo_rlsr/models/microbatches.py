"""How one step's rows are cut into micro-batches, and how data-parallel ranks agree on them.

Two ways to cut, the same loss either way (the loss is a sum over tokens that megatron divides by
the step's global token count, models/policy.py, so the grouping of rows never changes it):

- fixed: `micro_batch_size` consecutive rows per micro-batch, every one the batch's full width.
- token budget (`max_tokens_per_microbatch`; NeMo-RL calls it dynamic batching): rows sorted by
  length, longest first, each micro-batch cut to its longest row (rounded up to the policy's
  sequence multiple) and filled while rows x width stays within the budget. Rows are cut on the
  right only: every token keeps its column, so positions, and with them the logits, are those of
  the whole batch. A row that alone exceeds the budget is an error (the config rule
  `max_tokens_per_microbatch >= model.max_sequence_length` makes that impossible for any row a
  step can produce); it is not run alone, because the planner's activation memory assumes the
  budget bounds every micro-batch.

Agreement (`agree_across_ranks`): ranks must run the same micro-batches, in number and shape,
where a collective crosses data-parallel ranks inside every micro-batch: MoE layers under expert
parallelism exchange tokens between ranks that hold different rows (megatron's `allgather`
dispatcher gathers equal token counts over the expert group, `alltoall` needs equal counts of
micro-batches: one rule for both; generation/lockstep.py's group). There
the counts and each micro-batch's (rows, width) are all-reduced (MAX) and a rank with fewer or
smaller micro-batches runs filler micro-batches, filler rows and pad columns: copies of its first
row with an all-zero loss mask (zero loss, zero gradient, zero tokens), whose outputs are dropped.
Dense data-parallel ranks meet once per step, in the gradient all-reduce after their last
micro-batch (with the global token count), so unequal counts are correct there and no collective is
added ahead of it: a rank waiting for a slow peer waits in that all-reduce, where the watchdog's
stack dumps show it. Within one DP replica (TP, CP, PP ranks) every rank cuts the same batch the
same way. The interleaved pipeline schedule needs a multiple of PP micro-batches: fillers again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_rlsr.models.policy import TokenBatch


@dataclass
class MicroBatch:
    """A micro-batch's tensors and which rows of the step's batch its first `len(rows)` rows are
    (the rest are filler)."""

    rows: list[int]
    batch: TokenBatch


def row_lengths(batch: TokenBatch) -> list[int]:
    """Per row, one past its last valid column (0 for a row with none): the columns a right cut keeps."""
    columns = torch.arange(1, batch.valid.shape[1] + 1, device=batch.valid.device)
    return (batch.valid.bool() * columns).amax(dim=1).tolist()


def token_budget_groups(lengths: list[int], budget: int, multiple: int) -> list[list[int]]:
    """Row indices of each micro-batch: longest first (ties in row order), each filled while
    (rows x its first row's length rounded up to `multiple`) <= `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    width = 0
    for index in order:
        needed = _round_up(max(lengths[index], 1), multiple)
        if needed > budget:
            raise ValueError(f"a row of {lengths[index]} tokens ({needed} with the sequence multiple {multiple}) "
                             f"exceeds max_tokens_per_microbatch={budget}: raise it to at least {needed}")
        if groups and (len(groups[-1]) + 1) * width <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
            width = needed
    return groups


def cut(batch: TokenBatch, rows: list[int], width: int) -> TokenBatch:
    """`rows` of `batch` (in that order), columns [0, width); per-token extras cut alike, per-row kept."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    length = batch.input_ids.shape[1]

    def take(t: torch.Tensor | None, per_token: bool = True) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.index_select(0, index)
        return t[:, :width] if per_token and t.dim() >= 2 and t.shape[1] == length else t

    return TokenBatch(take(batch.input_ids), take(batch.valid), take(batch.loss_mask),
                      {k: take(v) for k, v in batch.extras.items()}, take(batch.segment_ids), take(batch.target_ids))


def plan_micro_batches(batch: TokenBatch, micro_batch_size: int, max_tokens: int | None,
                       multiple: int) -> list[MicroBatch]:
    """This rank's micro-batches of `batch` (already padded to `multiple` columns): fixed when
    `max_tokens` is 0/None (rows must divide into `micro_batch_size`), else token-budget ones."""
    if not max_tokens:
        if len(batch) % micro_batch_size:
            raise ValueError(f"batch of {len(batch)} sequences is not divisible by micro_batch_size={micro_batch_size}")
        return [MicroBatch(list(range(i, i + micro_batch_size)), batch.slice(i, i + micro_batch_size))
                for i in range(0, len(batch), micro_batch_size)]
    lengths = row_lengths(batch)
    groups = token_budget_groups(lengths, max_tokens, multiple)
    return [MicroBatch(rows, cut(batch, rows, _round_up(max(lengths[rows[0]], 1), multiple))) for rows in groups]


def filler(batch: TokenBatch, rows: int, width: int) -> TokenBatch:
    """`rows` copies of `batch`'s first row cut or padded to `width` columns, counting no token:
    loss mask all zero, so the loss, its gradient and the token count are exactly zero, while the
    row stays a real one (attention over real keys, no all-masked softmax)."""
    first = pad_columns(cut(batch, [0] * rows, min(width, batch.input_ids.shape[1])), width)
    first.loss_mask = torch.zeros_like(first.loss_mask)
    return first


def pad_columns(batch: TokenBatch, width: int) -> TokenBatch:
    """Right-pad to `width` columns with positions neither attended nor counted (per-token extras
    with zeros, segment ids with -1)."""
    length = batch.input_ids.shape[1]
    extra = width - length
    if extra <= 0:
        return batch

    def pad(t: torch.Tensor | None, value=0) -> torch.Tensor | None:
        if t is None or not (t.dim() >= 2 and t.shape[1] == length):
            return t
        return torch.nn.functional.pad(t, (0, extra), value=value)

    return TokenBatch(pad(batch.input_ids), pad(batch.valid, False), pad(batch.loss_mask),
                      {k: pad(v) for k, v in batch.extras.items()}, pad(batch.segment_ids, -1), pad(batch.target_ids))


def append_rows(batch: TokenBatch, extra: TokenBatch) -> TokenBatch:
    """`batch` with `extra`'s rows after its own (same width)."""

    def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.cat([a, b])

    return TokenBatch(cat(batch.input_ids, extra.input_ids), cat(batch.valid, extra.valid),
                      cat(batch.loss_mask, extra.loss_mask),
                      {k: cat(v, extra.extras[k]) for k, v in batch.extras.items()},
                      cat(batch.segment_ids, extra.segment_ids), cat(batch.target_ids, extra.target_ids))


def agree_across_ranks(micro: list[MicroBatch], batch: TokenBatch, count_multiple: int, group) -> list[MicroBatch]:
    """`micro` extended with filler micro-batches to a multiple of `count_multiple`, and with a
    `group` (None: this rank alone) to the largest count over it, each micro-batch grown to the
    largest (rows, width) of its index over the group."""
    import torch.distributed as dist

    device = batch.input_ids.device
    count = torch.tensor([len(micro)], device=device)
    if group is not None:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    total = _round_up(int(count), count_multiple)
    shapes = torch.zeros(total, 2, dtype=torch.long, device=device)
    for i, mb in enumerate(micro):
        shapes[i] = torch.tensor(mb.batch.input_ids.shape, device=device)
    if group is not None:
        dist.all_reduce(shapes, op=dist.ReduceOp.MAX, group=group)
    else:  # fillers of this rank alone: the shape of its last (under a budget: smallest) micro-batch
        shapes[len(micro):] = torch.tensor(micro[-1].batch.input_ids.shape, device=device)
    out = []
    for i, (rows, width) in enumerate(shapes.tolist()):
        if i >= len(micro):
            out.append(MicroBatch([], filler(batch, rows, width)))
            continue
        mb = micro[i].batch
        grown = pad_columns(mb, width)
        if rows > len(mb):
            grown = append_rows(grown, filler(batch, rows - len(mb), width))
        out.append(MicroBatch(micro[i].rows, grown))
    return out


def restore_order(outputs: list[torch.Tensor], micro: list[MicroBatch], rows: int, width: int) -> torch.Tensor:
    """[rows, width] from per-micro-batch outputs [b, w]: each real row back at its place in the
    step's batch, filler rows dropped; columns a micro-batch was cut off at stay 0 (pad, no loss)."""
    result = torch.zeros((rows, width), dtype=outputs[0].dtype, device=outputs[0].device)
    for out, mb in zip(outputs, micro):
        if mb.rows:
            index = torch.tensor(mb.rows, dtype=torch.long, device=out.device)
            keep = min(out.shape[1], width)
            result[index, :keep] = out[: len(mb.rows), :keep]
    return result


def padded_fraction(micro: list[MicroBatch]) -> float:
    """Share of the computed token positions that are not valid tokens (pads, fillers)."""
    total = sum(mb.batch.input_ids.numel() for mb in micro)
    real = sum(int(mb.batch.valid[: len(mb.rows)].sum()) for mb in micro)
    return 1.0 - real / max(total, 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
