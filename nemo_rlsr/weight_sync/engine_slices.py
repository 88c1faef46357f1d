"""What one TensorRT-LLM engine worker reads of each HF tensor, and which trainer ranks form an engine.

A refit should hand each engine worker only what it loads. TensorRT-LLM 1.2's loader takes FULL HF
tensors and cuts its rank's part itself, so "what it loads" is read from its source (1.2 line, the
stored versions named in generation/trtllm.py; the v1.2.0 tag itself is too large to fetch here):

* tensorrt_llm/_torch/modules/linear.py `load_weight_shard`: a tensor split over `tp_size` ranks
  gives rank r the block [r * ceil(w / tp), min((r + 1) * ceil(w / tp), w)) of its split dimension
  (dim 0 for COLUMN, dim 1 for ROW mode; 1-D tensors of ROW layers and widths of 1 whole).
  Column: q/k/v (weights and biases), gate/up; row: o_proj, down_proj.
* tensorrt_llm/_torch/modules/embedding.py: `Embedding` and `LMHead` (COLUMN in the decoder models)
  load vocabulary rows through the same function, on the unpadded HF row count.
* tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py `_duplicate_kv`: with fewer KV heads
  than ranks, k/v weights are repeated per head (`reps = tp // kv_heads`, each head `reps` times) and
  biases per element (`repeat_interleave(reps)`) BEFORE the slice; `kv_index_map` reproduces both.
* tensorrt_llm/mapping.py: `moe_ep_rank = tp_rank % moe_ep_size`, `moe_tp_rank = tp_rank //
  moe_ep_size`; an engine with expert parallel holds experts [ep_rank * n / ep, (ep_rank + 1) * n / ep)
  whole on its EP rank (split again over moe_tp ranks like a dense MLP).

Norms and routers are loaded whole, and so is every tensor of a multi-latent-attention model but its
routed experts: such an engine runs attention data-parallel, where TensorRT-LLM's embedding and LM
head are not split either (embedding.py: "Attention DP doesn't work with embedding parallelization"),
and the planner counts it that way (planner/memory.engine_weight_bytes). `EngineNeed` is the part one worker reads: the
shard refit (shard_refit.py) moves exactly that, and the worker gets a tensor of the full HF shape
whose other entries are never read (generation/trtllm.py `materialize`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_COLUMN = (".q_proj.weight", ".q_proj.bias", ".k_proj.weight", ".k_proj.bias", ".v_proj.weight", ".v_proj.bias",
           ".gate_proj.weight", ".up_proj.weight")
_ROW = (".o_proj.weight", ".down_proj.weight")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
_KV = (".k_proj.weight", ".k_proj.bias", ".v_proj.weight", ".v_proj.bias")


@dataclass(frozen=True)
class EngineLayout:
    """One engine's split: `tp` workers, of which `ep` split the routed experts (TensorRT-LLM's
    tensor_parallel_size and moe_expert_parallel_size); the model facts the slice rule needs."""

    tp: int
    kv_heads: int
    ep: int = 1
    num_experts: int = 0
    mla: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1 or self.tp % self.ep:
            raise ValueError(f"engine tensor_parallel={self.tp} must be a multiple of expert_parallel={self.ep}")
        if self.ep > 1 and (not self.num_experts or self.num_experts % self.ep):
            raise ValueError(f"engine expert_parallel={self.ep} needs a number of experts divisible by it "
                             f"(got {self.num_experts})")
        if not self.mla and self.kv_heads % self.tp and self.tp % self.kv_heads:
            raise ValueError(f"engine tensor_parallel={self.tp} and {self.kv_heads} KV heads: one must divide "
                             f"the other (TensorRT-LLM shards or duplicates whole KV heads)")


@dataclass(frozen=True)
class EngineNeed:
    """The part of one HF tensor a worker reads: `dim` None = all of it, else [start, stop) of `dim`."""

    dim: int | None
    start: int = 0
    stop: int = 0

    def box(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """Index of the needed part in a tensor of the full HF `shape`."""
        index = [slice(None)] * len(shape)
        if self.dim is not None:
            index[self.dim] = slice(self.start, self.stop)
        return tuple(index)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        if self.dim is not None:
            out[self.dim] = self.stop - self.start
        return tuple(out)


WHOLE = EngineNeed(None)


def trtllm_block(width: int, size: int, rank: int) -> tuple[int, int]:
    """`load_weight_shard`'s block of rank `rank` of `size` along a dimension of `width` entries."""
    step = math.ceil(width / size)
    return min(rank * step, width), min((rank + 1) * step, width)


def kv_index_map(rows: int, layout: EngineLayout, is_bias: bool) -> torch.Tensor:
    """Original row of each row of the k/v tensor TensorRT-LLM slices (after `_duplicate_kv`)."""
    reps = max(layout.tp // layout.kv_heads, 1)
    if reps == 1:
        return torch.arange(rows)
    if is_bias:
        return torch.arange(rows).repeat_interleave(reps)
    per_head = rows // layout.kv_heads
    return torch.arange(rows).reshape(layout.kv_heads, 1, per_head).expand(-1, reps, -1).reshape(-1)


def _split(name: str, shape: tuple[int, ...], dim: int, size: int, rank: int, layout: EngineLayout) -> EngineNeed:
    if len(shape) <= dim or shape[dim] == 1 or size == 1:
        return WHOLE
    if dim == 0 and name.endswith(_KV) and layout.tp > layout.kv_heads:
        index = kv_index_map(shape[0], layout, name.endswith(".bias"))
        start, stop = trtllm_block(len(index), size, rank)
        rows = index[start:stop].unique()  # sorted; a bias reads some entries twice
        if not torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1)):
            raise ValueError(f"{name}: engine rank {rank} would read rows {rows.tolist()}, not one block")
        return EngineNeed(0, int(rows[0]), int(rows[-1]) + 1)
    return EngineNeed(dim, *trtllm_block(shape[dim], size, rank))


def engine_need(name: str, shape: tuple[int, ...], layout: EngineLayout, rank: int) -> EngineNeed | None:
    """What engine worker `rank` reads of HF tensor `name` of full `shape`; None: nothing (a routed
    expert another EP rank holds)."""
    if not 0 <= rank < layout.tp:
        raise ValueError(f"engine rank {rank} outside tensor_parallel={layout.tp}")
    expert = _EXPERT.search(name)
    if expert:
        ep_rank, moe_tp, moe_tp_rank = rank % layout.ep, layout.tp // layout.ep, rank // layout.ep
        if layout.ep > 1 and int(expert[1]) // (layout.num_experts // layout.ep) != ep_rank:
            return None
        return _split(name, shape, 1 if expert[2] == "down" else 0, moe_tp, moe_tp_rank, layout)
    if layout.mla:  # attention data-parallel: only the routed experts are split
        return WHOLE
    if name in _VOCAB or name.endswith(_COLUMN):
        return _split(name, shape, 0, layout.tp, rank, layout)
    if name.endswith(_ROW):
        return _split(name, shape, 1, layout.tp, rank, layout)
    return WHOLE


def engine_groups(model_parallel_groups: list[list[int]], engine_tp: int) -> list[list[int]]:
    """The trainer ranks of each engine, ascending, worker i on ranks[i]: an engine of `engine_tp`
    workers takes consecutive ranks of one model-parallel group (engine_tp divides TP x PP) or whole
    consecutive groups (engine_tp a multiple of TP x PP: those groups are data-parallel replicas, same
    weights). Ascending because TensorRT-LLM numbers a placement's workers node by node
    (trtllm_placement.plan_engines checks the two agree). A group listed more than once counts once."""
    groups = sorted({tuple(sorted(g)) for g in model_parallel_groups})  # each rank may report its own
    groups = [list(g) for g in groups]
    size = len(groups[0])
    if any(len(g) != size for g in groups) or engine_tp < 1:
        raise ValueError(f"bad model-parallel groups {groups} or engine size {engine_tp}")
    if size % engine_tp == 0:
        return [g[i:i + engine_tp] for g in groups for i in range(0, size, engine_tp)]
    per_engine = engine_tp // size
    if engine_tp % size or len(groups) % per_engine:
        raise ValueError(f"rollout.tensor_parallel={engine_tp} must divide or be a multiple of the trainer's "
                         f"tensor_parallel x pipeline_parallel = {size} (and use whole data-parallel replicas: "
                         f"{len(groups)} of them)")
    return [sorted(sum(groups[i:i + per_engine], [])) for i in range(0, len(groups), per_engine)]
