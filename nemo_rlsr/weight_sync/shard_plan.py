"""Which trainer rank holds each part an engine worker needs: the transfers of a shard-only refit.

Pure (no process group) and deterministic: a rank plans, parameter by parameter, the workers whose
transfers can involve it, and the source and the destination of a piece compute the same piece.

How a part is found without gathering anything: an adapter's `to_hf` only renames, splits or trims
ROWS (q/k/v out of megatron's per-group interleave, gate/up out of fc1, vocabulary rows), so
`to_hf(arange(rows))` says which megatron row each HF row is. Megatron's TP split (expert TP for
routed experts) is by rows (`partition_dim` 0; fc1 as [gate_shard; up_shard], fused.glu_shard) or by
columns (`partition_dim` 1), so each needed HF row or column has one owner shard rank and a position
in its shard. Which ranks hold shard t of a parameter (`holders`) comes from every rank's own list
of global parameter names, so routed experts under training expert parallelism are found on
whichever data-parallel ranks hold them. A worker takes a part from itself when it can, else from
its own model-parallel group, else from the nearest rank number (same node in a block layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import VOCAB_PARAMS, HFAdapter
from nemo_rlsr.models.hf.fused import glu_shard
from nemo_rlsr.weight_sync.engine_slices import EngineLayout, EngineNeed, engine_need

Index = tuple[torch.Tensor | None, torch.Tensor | None]  # (rows, columns); None: all of them


@dataclass(frozen=True)
class ParamMeta:
    """One megatron parameter as every rank sees it: global name, FULL shape (shards joined,
    megatron's vocabulary padding kept), `partition_dim` (None when not split) over `split` ranks
    (its TP group, expert TP for routed experts)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    partition_dim: int | None
    glu: bool
    split: int = 1


@dataclass(frozen=True)
class Piece:
    """`src` sends `dst` the entries `local` of its shard; they go to `box` of dst's needed part."""

    src: int
    dst: int
    local: Index
    box: Index


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str  # the megatron parameter it comes from
    needs: dict[int, EngineNeed] = field(default_factory=dict)  # worker rank -> its part
    pieces: list[Piece] = field(default_factory=list)


@dataclass(frozen=True)
class Worker:
    """A trainer rank as an engine worker: its engine rank and its model-parallel group's ranks."""

    rank: int
    engine_rank: int
    group: tuple[int, ...]

    def source(self, ranks: list[int]) -> int:
        """Which of `ranks` (all holding the same shard) sends to this worker."""
        if self.rank in ranks:
            return self.rank
        near = [r for r in ranks if r in self.group]
        if near:
            return near[self.rank % len(near)]  # spread the replicated tensors over the stage's ranks
        return min(ranks, key=lambda r: (abs(r - self.rank), r))


def row_owners(meta: ParamMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner TP rank, position in its shard) of every megatron row of a row-split parameter."""
    rows, tp = meta.shape[0], meta.split
    owner, position, every = torch.empty(rows, dtype=torch.long), torch.empty(rows, dtype=torch.long), torch.arange(rows)
    for t in range(tp):
        held = glu_shard(every, t, tp) if meta.glu else every.chunk(tp)[t]
        owner[held], position[held] = t, torch.arange(len(held))
    return owner, position


def _all(n: int) -> torch.Tensor:
    return torch.arange(n)


def plan_param(meta: ParamMeta, adapter: HFAdapter, cfg: ModelConfig, layout: EngineLayout,
               workers: list[Worker], holders: dict[int, list[int]]) -> list[PlannedTensor]:
    """The HF tensors of one megatron parameter, each with every worker's part and its transfers.
    `holders[t]`: the ranks holding shard t of it. `cfg.vocab_size` is the true vocabulary."""
    rows = cfg.vocab_size if meta.name in VOCAB_PARAMS else meta.shape[0]
    row_maps = adapter.to_hf(cfg, meta.name, torch.arange(rows))
    shapes = adapter.to_hf(cfg, meta.name, torch.empty((rows,) + tuple(meta.shape[1:]), device="meta"))
    for hf_name, megatron_rows in row_maps.items():  # the row map holds only for row-wise conversions
        if tuple(shapes[hf_name].shape) != (len(megatron_rows),) + tuple(meta.shape[1:]):
            raise ValueError(f"{type(adapter).__name__} turns {meta.name} into {hf_name} by more than moving rows "
                             f"({tuple(shapes[hf_name].shape)}): the shard refit cannot plan it")
    owners = row_owners(meta) if meta.partition_dim == 0 else None
    out = []
    for hf_name, megatron_rows in row_maps.items():
        shape = (len(megatron_rows),) + tuple(meta.shape[1:])
        planned = PlannedTensor(hf_name, shape, meta.dtype, meta.name)
        for worker in workers:
            need = engine_need(hf_name, shape, layout, worker.engine_rank)
            if need is None:
                continue
            planned.needs[worker.rank] = need
            planned.pieces += _pieces(meta, owners, megatron_rows, shape, need, worker, holders)
        out.append(planned)
    return out


def _pieces(meta, owners, megatron_rows, shape, need: EngineNeed, worker: Worker, holders) -> list[Piece]:
    hf_rows = _all(shape[0])[need.start:need.stop] if need.dim == 0 else _all(shape[0])
    cols = _all(shape[1])[need.start:need.stop] if need.dim == 1 else None
    rows = megatron_rows[hf_rows]
    if meta.partition_dim == 0:
        owner, position = owners
        held_by = owner[rows]
        return [Piece(worker.source(holders[t]), worker.rank, (position[rows[held_by == t]], cols),
                      (torch.nonzero(held_by == t)[:, 0], None)) for t in held_by.unique().tolist()]
    if meta.partition_dim == 1:
        cols = _all(shape[1]) if cols is None else cols
        width = meta.shape[1] // meta.split
        held_by = cols // width
        return [Piece(worker.source(holders[t]), worker.rank, (rows, cols[held_by == t] % width),
                      (None, torch.nonzero(held_by == t)[:, 0])) for t in held_by.unique().tolist()]
    return [Piece(worker.source(holders[0]), worker.rank, (rows, cols), (None, None))]


def take(tensor: torch.Tensor, index: Index) -> torch.Tensor:
    """The entries `index` of `tensor` (rows, then columns), contiguous: what a source sends."""
    rows, cols = index
    if rows is not None:
        tensor = tensor.index_select(0, rows.to(tensor.device))
    if cols is not None:
        tensor = tensor.index_select(1, cols.to(tensor.device))
    return tensor.contiguous()


def place(box: torch.Tensor, index: Index, data: torch.Tensor) -> None:
    """Write a received piece into the worker's part (the inverse of `take` on the part)."""
    rows, cols = (None if i is None else i.to(box.device) for i in index)
    if rows is None and cols is None:
        box.copy_(data)
    elif cols is None:
        box.index_copy_(0, rows, data)
    elif rows is None:
        box.index_copy_(1, cols, data)
    else:
        box[rows[:, None], cols] = data

