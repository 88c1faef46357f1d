"""This rank's megatron GPTModel -> HF-named full tensors, and an HF safetensors checkpoint.

`iter_hf_tensors` is the one place that turns megatron parameters into HF tensors: it all-gathers
each parameter's TP shards (the inverse of load.shard), trims the padded vocabulary rows and maps
the names with the adapter. It is a collective over the TP group (every TP rank of a stage must
iterate it in lockstep) and yields the tensors of THIS rank's pipeline stage; the rollout refit
consumes it bucket by bucket (`iter_all_hf_tensors`: every stage's tensors on every rank), and
`save_hf_checkpoint` writes it to files.

Files under pipeline parallelism (the simplest correct scheme without moving weights between
stages): every rank first derives its stage's HF names, shapes and dtypes from parameter shapes
alone (`stage_plan`, no data), the plans of all stages are exchanged (all_gather_object), and the
same deterministic packing into `model-0000k-of-0000N.safetensors` files (`model.safetensors`
when N is 1, as HF names it) (never across stages, at
most `max_shard_bytes` each unless one tensor is larger) is computed on every rank. Then the first
TP rank of the first data-parallel replica of each stage writes its own stage's files, streaming
(at most one file's tensors in memory), and global rank 0 writes the index and config.json.
The output directory must be on a filesystem every writer sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import VOCAB_PARAMS, HFAdapter
from nemo_rlsr.models.hf.expert_parallel import ep_size_and_rank, expert_peers, gather_experts, shard_group
from nemo_rlsr.models.hf.fused import glu_unshard, is_glu_fc1
from nemo_rlsr.models.hf.load import INDEX, SINGLE, global_parameters, is_tp_sharded

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def gather_tp(name: str, param: torch.Tensor) -> torch.Tensor:
    """The full megatron tensor of `param` from all TP ranks' shards (collective over TP; over
    expert TP for a routed expert's parameter)."""
    group = shard_group(name)
    tp = dist.get_world_size(group)
    local = param.detach()
    if not is_tp_sharded(param) or tp == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=group)
    if is_glu_fc1(name):
        return glu_unshard(shards)
    return torch.cat(shards, dim=param.partition_dim)


def trim_vocab(name: str, full: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return full[:vocab_size] if name in VOCAB_PARAMS else full


def iter_hf_tensors(modules, adapter: HFAdapter, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of this rank's pipeline stage, on every TP rank of the stage.

    Tensors may be views sharing storage (e.g. gate and up of one fc1): clone before keeping
    them beyond the next iteration or serialising several together. `cfg.vocab_size` is the
    true (unpadded) vocabulary. Under expert parallelism every rank yields every expert (all-gathered
    over the EP group), so it is also a collective over EP.
    """
    num_local_experts = (cfg.num_moe_experts or 0) // ep_size_and_rank()[0]
    for name, param in global_parameters(modules):
        full = trim_vocab(name, gather_tp(name, param), cfg.vocab_size)
        for global_name, tensor in gather_experts(name, full, num_local_experts).items():
            yield from adapter.to_hf(cfg, global_name, tensor).items()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def stage_plan(modules, adapter: HFAdapter, cfg: ModelConfig) -> list[PlannedTensor]:
    """What `iter_hf_tensors` will yield on this stage, in order, from shapes only (meta tensors)."""
    ep, ep_rank = ep_size_and_rank()
    num_local_experts = (cfg.num_moe_experts or 0) // ep
    plan = []
    for name, param in global_parameters(modules):
        shape = list(param.shape)
        if is_tp_sharded(param):
            shape[param.partition_dim] *= dist.get_world_size(shard_group(name))
        full = trim_vocab(name, torch.empty(shape, dtype=param.dtype, device="meta"), cfg.vocab_size)
        for global_name in expert_peers(name, ep, ep_rank, num_local_experts):
            plan += [PlannedTensor(hf, tuple(t.shape), t.dtype)
                     for hf, t in adapter.to_hf(cfg, global_name, full).items()]
    return plan


def all_stage_plans(modules, adapter: HFAdapter, cfg: ModelConfig) -> list[list[PlannedTensor]]:
    """Every pipeline stage's `stage_plan`, in stage order (all_gather_object over the PP group)."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (parallel_state.get_pipeline_model_parallel_rank(),
                                      stage_plan(modules, adapter, cfg)), group=group)
    return [plan for _, plan in sorted(gathered, key=lambda item: item[0])]


def iter_all_hf_tensors(modules, adapter: HFAdapter, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `iter_hf_tensors`, but every rank yields the tensors of ALL pipeline stages (stage by
    stage, each tensor broadcast from its stage over the PP group): what a rollout engine laid out
    without PP needs from a PP-sharded trainer. A collective over TP, EP and PP; one tensor in flight.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    plans = all_stage_plans(modules, adapter, cfg)
    mine = iter_hf_tensors(modules, adapter, cfg)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    device = next(p for chunk in (modules if isinstance(modules, (list, tuple)) else [modules])
                  for p in chunk.parameters()).device
    for source, plan in enumerate(plans):
        for planned in plan:
            if source == stage:
                name, tensor = next(mine)
                assert name == planned.name, (name, planned.name)
                tensor = tensor.contiguous()
            else:
                tensor = torch.empty(planned.shape, dtype=planned.dtype, device=device)
            if len(plans) > 1:
                dist.broadcast(tensor, src=dist.get_global_rank(group, source), group=group)
            yield planned.name, tensor


def pack_files(stage_plans: list[list[PlannedTensor]], max_shard_bytes: int) -> list[list[tuple[int, str]]]:
    """Per stage, its files as [(global file number, ...)]: greedy packing in yield order.

    Returns, for each stage, one (file number, tensor name) pair per tensor; numbers are global
    and consecutive, so every rank computes the same names.
    """
    assignment, number = [], 0
    for plan in stage_plans:
        stage, size = [], None
        for tensor in plan:
            if size is None or size + tensor.nbytes > max_shard_bytes and size > 0:
                number, size = number + 1, 0
            stage.append((number, tensor.name))
            size += tensor.nbytes
        assignment.append(stage)
    return assignment


def file_name(number: int, total: int) -> str:
    """HF's names: one `model.safetensors` when everything fits in one file (then no index)."""
    return SINGLE if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"


def _is_stage_writer() -> bool:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0)


def save_hf_checkpoint(modules, adapter: HFAdapter, cfg: ModelConfig, out_dir: str | Path,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict | None = None) -> Path:
    """Write this model as an HF checkpoint (collective over all ranks; see the module docstring).

    `extra_config` goes into config.json on top of the adapter's (e.g. bos/eos/pad token ids).
    """
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    plans = all_stage_plans(modules, adapter, cfg)
    names = [t.name for p in plans for t in p]
    if len(names) != len(set(names)):
        raise ValueError(f"two megatron parameters map to one HF tensor: {sorted({n for n in names if names.count(n) > 1})}")
    files = pack_files(plans, max_shard_bytes)
    total = max((number for stage_files in files for number, _ in stage_files), default=0)

    # every rank iterates: the writer's TP peers take part in the TP all-gathers, its EP peers
    # (in other data-parallel replicas) in the expert all-gathers; only the writer keeps tensors
    writer = _is_stage_writer()
    numbers = dict((name, number) for number, name in files[stage])
    buffer, current = {}, None
    for hf_name, tensor in iter_hf_tensors(modules, adapter, cfg):
        if not writer:
            continue
        if current is not None and numbers[hf_name] != current:
            save_file(buffer, out / file_name(current, total), metadata={"format": "pt"})
            buffer = {}
        current = numbers[hf_name]
        buffer[hf_name] = tensor.detach().to("cpu").clone()
    if writer and buffer:
        save_file(buffer, out / file_name(current, total), metadata={"format": "pt"})

    if dist.get_rank() == 0:
        weight_map = {name: file_name(number, total) for stage_files in files for number, name in stage_files}
        index = {"metadata": {"total_size": sum(t.nbytes for p in plans for t in p)}, "weight_map": weight_map}
        if total > 1:
            (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        (out / "config.json").write_text(json.dumps({**adapter.hf_config(cfg), **(extra_config or {})}, indent=2))
    dist.barrier()
    return out
