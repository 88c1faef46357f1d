"""Shard-only refit: each trainer rank receives only what the engine worker on its GPU loads.

The full-tensor stream (source.py) gives every rank of a model-parallel group every full HF tensor
(TP shards all-gathered, every PP stage broadcast): at 1T parameters ~2 TB per GPU per refit, where
a worker of an engine with tensor_parallel E loads about 1/E of it. Here every rank is the worker
of the engine laid out by `engine_slices.engine_groups` on its GPU, and gets, per HF tensor, the
part `engine_slices.engine_need` says its engine rank reads, assembled from point-to-point pieces
of the trainer ranks that hold them (`shard_plan`): no rank ever holds a full tensor it does not
load. The engine layout (E, engine expert parallel) is free of the trainer's TP x PP.

`ShardRefit` is built once per engine (one all_gather_object of every rank's parameter metadata);
its plan (this rank's side of it: its own part and the pieces it sends or receives) is computed on
the first refit and kept. `stream()` is a collective over all ranks: every rank walks the HF tensors
in the same order, posts its sends and receives for each, waits, and yields its own part (a pair of
ranks exchanges at most one piece per tensor, so the point-to-point messages match in order). `received_bytes` counts what
arrived from other ranks (copies from the rank's own shard are free), the figure the planner models
(planner/timing.refit_received_bytes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import HFAdapter
from nemo_rlsr.models.hf.expert_parallel import shard_group_size_and_rank
from nemo_rlsr.models.hf.fused import is_glu_fc1
from nemo_rlsr.models.hf.load import global_parameters, is_tp_sharded
from nemo_rlsr.weight_sync.engine_slices import EngineLayout, EngineNeed, engine_groups
from nemo_rlsr.weight_sync.shard_plan import ParamMeta, PlannedTensor, Worker, place, plan_param, take


@dataclass(frozen=True)
class EngineSlice:
    """A worker's part of one HF tensor of full `shape`: `need` says which part, `data` holds it
    (both None when this worker loads nothing of the tensor, e.g. another EP rank's expert)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    need: EngineNeed | None
    data: torch.Tensor | None

    @property
    def full_bytes(self) -> int:
        """Bytes of the full tensor: what the engine's loader is handed (`materialize`), the same on
        every worker, so buckets cut by it line up across an engine's workers."""
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def materialize(self) -> torch.Tensor:
        """A tensor of the full HF shape holding the part where the engine's loader reads it; the
        rest is left uninitialised (TensorRT-LLM 1.2 slices full tensors itself, engine_slices.py)."""
        if self.need is None:
            raise ValueError("this worker loads nothing of the tensor")
        if self.need.dim is None:
            return self.data
        full = torch.empty(self.shape, dtype=self.data.dtype, device=self.data.device)
        full[self.need.box(self.shape)] = self.data
        return full


def local_metadata(modules) -> tuple[list[tuple[ParamMeta, int]], dict[str, torch.Tensor]]:
    """This rank's parameters as (ParamMeta with the full shape, its shard rank), in module order,
    and {global name: local shard}."""
    metas, local = [], {}
    for name, param in global_parameters(modules):
        size, rank = shard_group_size_and_rank(name)
        shape = list(param.shape)
        split = param.partition_dim if is_tp_sharded(param) and size > 1 else None
        if split is None:
            size, rank = 1, 0
        else:
            shape[split] *= size
        metas.append((ParamMeta(name, tuple(shape), param.dtype, split, is_glu_fc1(name), size), rank))
        local[name] = param.detach()
    return metas, local


def engine_layout(cfg: ModelConfig, engine_tp: int, engine_ep: int = 1) -> EngineLayout:
    heads = cfg.num_attention_heads
    return EngineLayout(engine_tp, cfg.num_query_groups or heads, engine_ep, cfg.num_moe_experts or 0,
                        cfg.multi_latent_attention)


class ShardRefit:
    """See the module docstring. `modules`: this rank's model or its chunks (MegatronPolicy.chunks);
    `cfg.vocab_size` is ignored in favour of `vocab_size` (the rows sent, the tokenizer's)."""

    def __init__(self, modules, adapter: HFAdapter, cfg: ModelConfig, vocab_size: int, engine_tp: int,
                 engine_ep: int = 1) -> None:
        from megatron.core import parallel_state

        self.adapter, self.cfg = adapter, dataclasses.replace(cfg, vocab_size=vocab_size)
        self.layout = engine_layout(cfg, engine_tp, engine_ep)
        metas, self.local = local_metadata(modules)
        mine = {"rank": dist.get_rank(), "stage": parallel_state.get_pipeline_model_parallel_rank(),
                "group": dist.get_process_group_ranks(parallel_state.get_model_parallel_group()), "params": metas}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.model_parallel_groups = [r["group"] for r in everyone]
        self.groups = engine_groups(self.model_parallel_groups, engine_tp)
        self.workers = [Worker(rank, engine_rank, tuple(everyone[rank]["group"]))
                        for group in self.groups for engine_rank, rank in enumerate(group)]
        self.params, self.holders = parameter_index(everyone)
        self.rank = dist.get_rank()
        self.received_bytes = 0
        self._plan: list[PlannedTensor] | None = None  # this rank's side of the plan, built once

    def _candidates(self, holders: dict[int, list[int]]) -> list[Worker]:
        """The workers whose pieces of a parameter can involve this rank: itself, and, where it holds
        a shard, those that may pick it (Worker.source: its own model-parallel group's, and every
        worker whose group holds no copy). Planning only these keeps the plan per rank about its
        own transfers, not world size x tensors."""
        mine = [w for w in self.workers if w.rank == self.rank]
        held = [ranks for ranks in holders.values() if self.rank in ranks]
        if not held:
            return mine
        own_group = mine[0].group
        return [w for w in self.workers
                if w.rank == self.rank or self.rank in w.group and w.group == own_group
                or any(not set(ranks) & set(w.group) for ranks in held)]

    def plan(self) -> list[PlannedTensor]:
        """Every HF tensor in plan order (the same on every rank) with this rank's part and the pieces
        it sends or receives; computed on the first refit and kept (the layout never changes)."""
        if self._plan is None:
            self._plan = []
            for meta in self.params:
                holders = self.holders[meta.name]
                for planned in plan_param(meta, self.adapter, self.cfg, self.layout, self._candidates(holders), holders):
                    planned.pieces = [p for p in planned.pieces if self.rank in (p.src, p.dst)]
                    planned.needs = {r: n for r, n in planned.needs.items() if r == self.rank}
                    self._plan.append(planned)
        return self._plan

    @property
    def engine_group(self) -> list[int]:
        return next(g for g in self.groups if self.rank in g)

    def stream(self) -> Iterator[tuple[str, EngineSlice]]:
        """(HF name, this worker's part) of every HF tensor of the model, in plan order (the same on
        every rank; the part is empty where this worker loads nothing of a tensor)."""
        me = self.rank
        for planned in self.plan():
            need = planned.needs.get(me)
            box = None if need is None else torch.empty(need.shape(planned.shape), dtype=planned.dtype,
                                                         device=self._device())
            works, arrivals = [], []
            for piece in planned.pieces:
                if piece.src == me and piece.dst == me:
                    place(box, piece.box, take(self.local[planned.param], piece.local))
                elif piece.src == me:
                    data = take(self.local[planned.param], piece.local)
                    works.append((dist.isend(data, piece.dst), data))
                else:
                    data = torch.empty(_piece_shape(box, piece.box), dtype=planned.dtype, device=box.device)
                    works.append((dist.irecv(data, piece.src), data))
                    arrivals.append((piece, data))
            for work, _ in works:
                work.wait()
            for piece, data in arrivals:
                place(box, piece.box, data)
                self.received_bytes += data.numel() * data.element_size()
            yield planned.name, EngineSlice(planned.shape, planned.dtype, need, box)

    def _device(self) -> torch.device:
        return next(iter(self.local.values())).device


def _piece_shape(box: torch.Tensor, index) -> tuple[int, ...]:
    shape = list(box.shape)
    for dim, positions in enumerate(index):
        if positions is not None:
            shape[dim] = len(positions)
    return tuple(shape)


def parameter_index(everyone: list[dict]) -> tuple[list[ParamMeta], dict[str, dict[int, list[int]]]]:
    """Every parameter of the model once, stage by stage (each stage's ranks in rank order, each
    rank's module order), and per parameter {shard rank: ranks holding that shard}."""
    params, holders = [], {}
    for info in sorted(everyone, key=lambda r: (r["stage"], r["rank"])):
        for meta, shard in info["params"]:
            if meta.name not in holders:
                params.append(meta)
                holders[meta.name] = {}
            holders[meta.name].setdefault(shard, []).append(info["rank"])
    return params, holders
