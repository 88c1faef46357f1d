"""Shard-only refit: each trainer rank receives only what the engine worker on its GPU loads.

The full-tensor stream (source.py) gives every rank of a model-parallel group every full HF tensor
(TP shards all-gathered, every PP stage broadcast): at 1T parameters ~2 TB per GPU per refit, where
a worker of an engine with tensor_parallel E loads about 1/E of it. Here every rank is the worker
of the engine laid out by `engine_slices.engine_groups` on its GPU, and gets, per HF tensor, the
part `engine_slices.engine_need` says its engine rank reads, assembled from point-to-point pieces
of the trainer ranks that hold them (`shard_plan`): no rank ever holds a full tensor it does not
load. The engine layout (E, engine expert parallel) is free of the trainer's TP x PP.

`ShardRefit` is built once per engine (one all_gather_object of every rank's parameter metadata);
`stream()` is a collective over all ranks: every rank walks the same plan, tensor by tensor, posts
its sends and receives for that tensor, waits, and yields its own part. `received_bytes` counts what
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
from nemo_rlsr.weight_sync.shard_plan import ParamMeta, Worker, place, plan_param, take


@dataclass(frozen=True)
class EngineSlice:
    """A worker's part of one HF tensor: the tensor's full `shape`, the part (`need`) and its data."""

    shape: tuple[int, ...]
    need: EngineNeed
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def materialize(self) -> torch.Tensor:
        """A tensor of the full HF shape holding the part where the engine's loader reads it; the
        rest is left uninitialised (TensorRT-LLM 1.2 slices full tensors itself, engine_slices.py)."""
        if self.need.dim is None:
            return self.data
        full = torch.empty(self.shape, dtype=self.data.dtype, device=self.data.device)
        full[self.need.box(self.shape)] = self.data
        return full


def local_metadata(modules) -> tuple[list[ParamMeta], dict[str, torch.Tensor]]:
    """This rank's parameters as ParamMeta (full shapes) and {global name: local shard}."""
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    metas, local = [], {}
    for name, param in global_parameters(modules):
        tp, _ = shard_group_size_and_rank(name)
        shape = list(param.shape)
        split = param.partition_dim if is_tp_sharded(param) and tp > 1 else None
        if split is not None:
            shape[split] *= tp
        metas.append(ParamMeta(name, tuple(shape), param.dtype, split, is_glu_fc1(name), stage))
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

        if parallel_state.get_expert_model_parallel_world_size() > 1:
            raise ValueError("shard refit at parallel.expert_parallel > 1 is not built (the experts of a "
                             "worker's part would come from other data-parallel ranks)")
        self.adapter, self.cfg = adapter, dataclasses.replace(cfg, vocab_size=vocab_size)
        self.layout = engine_layout(cfg, engine_tp, engine_ep)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        metas, self.local = local_metadata(modules)
        mine = {"rank": dist.get_rank(), "stage": parallel_state.get_pipeline_model_parallel_rank(),
                "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "group": dist.get_process_group_ranks(parallel_state.get_model_parallel_group()), "params": metas}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.groups = engine_groups([r["group"] for r in everyone], engine_tp)
        self.workers = workers(everyone, self.groups)
        stages = {r["stage"]: r["params"] for r in sorted(everyone, key=lambda r: r["rank"], reverse=True)}
        self.params = [meta for stage in sorted(stages) for meta in stages[stage]]
        self.rank = dist.get_rank()
        self.received_bytes = 0

    @property
    def engine_group(self) -> list[int]:
        return next(g for g in self.groups if self.rank in g)

    def stream(self) -> Iterator[tuple[str, EngineSlice]]:
        """(HF name, this worker's part) of every HF tensor its engine rank loads, in plan order."""
        me = self.rank
        for meta in self.params:
            for planned in plan_param(meta, self.adapter, self.cfg, self.tp, self.layout, self.workers):
                need = planned.needs.get(me)
                box = None if need is None else torch.empty(need.shape(planned.shape), dtype=planned.dtype,
                                                             device=self._device())
                works, arrivals = [], []
                for piece in planned.pieces:
                    if piece.src == me and piece.dst == me:
                        place(box, piece.box, take(self.local[meta.name], piece.local))
                    elif piece.src == me:
                        data = take(self.local[meta.name], piece.local)
                        works.append((dist.isend(data, piece.dst), data))
                    elif piece.dst == me:
                        data = torch.empty(_piece_shape(box, piece.box), dtype=planned.dtype, device=box.device)
                        works.append((dist.irecv(data, piece.src), data))
                        arrivals.append((piece, data))
                for work, _ in works:
                    work.wait()
                for piece, data in arrivals:
                    place(box, piece.box, data)
                    self.received_bytes += data.numel() * data.element_size()
                if box is not None:
                    yield planned.name, EngineSlice(planned.shape, need, box)

    def _device(self) -> torch.device:
        return next(iter(self.local.values())).device


def _piece_shape(box: torch.Tensor, index) -> tuple[int, ...]:
    shape = list(box.shape)
    for dim, positions in enumerate(index):
        if positions is not None:
            shape[dim] = len(positions)
    return tuple(shape)


def workers(everyone: list[dict], groups: list[list[int]]) -> list[Worker]:
    """Every rank as an engine worker (engine rank = its position in its engine group), with the
    ranks of its own model-parallel group by (stage, TP rank)."""
    by_rank = {r["rank"]: r for r in everyone}
    out = []
    for group in groups:
        for engine_rank, rank in enumerate(group):
            info = by_rank[rank]
            sources = {(by_rank[m]["stage"], by_rank[m]["tp_rank"]): m for m in info["group"]}
            out.append(Worker(rank, engine_rank, info["stage"], info["tp_rank"], sources))
    return out
