"""HF safetensors -> this rank's megatron GPTModel, streaming tensor by tensor.

Every rank walks its OWN parameters (its pipeline stage's layers, its TP shard), asks the adapter
for the full megatron tensor of each (which reads only the HF tensors it needs, memory-mapped
from the safetensors files), slices this rank's TP shard and copies it in. At no time does a
process hold more than one full parameter besides its own shard, so a 70B checkpoint loads on
every rank without any rank materialising the model.

* Layer names: a PP stage's module numbers its layers from 0; `layer_number` (1-based, global,
  megatron adds the stage's offset) gives the global index the HF names use.
* TP: `tensor_model_parallel` / `partition_dim` are the parameter's own megatron attributes; fc1
  under GLU is sharded as [gate_shard; up_shard] (fused.glu_shard), not as rows of [gate; up].
* Vocabulary: megatron's embedding/output rows are padded (gpt.padded_vocab_size); the padded
  rows are zero (they are masked out of every softmax). Under TP each rank reads only its own
  rows of these (safetensors `get_slice`), the largest tensors of a checkpoint.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import LAYER, VOCAB_PARAMS, HFAdapter
from nemo_rlsr.models.hf.expert_parallel import ep_size_and_rank, global_expert_name, shard_group_size_and_rank
from nemo_rlsr.models.hf.fused import glu_shard, is_glu_fc1
from nemo_rlsr.models.hf.moe_mlp import CHECKPOINT_BUFFERS

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsReader:
    """Lazy tensor reads from an HF checkpoint directory (sharded with an index, or one file).

    Each file is opened once (safetensors memory-maps it); `read` copies out one tensor.
    """

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        if (self.hf_dir / INDEX).is_file():
            self.weight_map = json.loads((self.hf_dir / INDEX).read_text())["weight_map"]
        elif (self.hf_dir / SINGLE).is_file():
            with safe_open(self.hf_dir / SINGLE, framework="pt") as handle:
                self.weight_map = {name: SINGLE for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{self.hf_dir}: neither {INDEX} nor {SINGLE} (only safetensors are read)")
        self._open = safe_open
        self._handles: dict[str, object] = {}

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir}: no tensor {name!r} in the checkpoint")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.hf_dir / file, framework="pt")
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor (clamped to its length), reading only those bytes."""
        part = self._handle(name).get_slice(name)
        rows = part.get_shape()[0]
        return part[min(start, rows):min(stop, rows)]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (their parameter names carry `module.`)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def global_parameters(modules: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name with the GLOBAL layer and expert indices, parameter) of this rank's model chunk(s).

    Buffers that a checkpoint carries (the router's expert bias, CHECKPOINT_BUFFERS) come too."""
    chunks = modules if isinstance(modules, (list, tuple)) else [modules]
    ep, ep_rank = ep_size_and_rank()
    for chunk in chunks:
        model = unwrap(chunk)
        num_local_experts = (model.config.num_moe_experts or 0) // ep
        buffers = [(n, b) for n, b in model.named_buffers() if n.endswith(CHECKPOINT_BUFFERS)]
        for name, param in list(model.named_parameters()) + buffers:
            match = LAYER.match(name)
            if match:
                number = model.decoder.layers[int(match[1])].layer_number  # 1-based, global
                name = f"decoder.layers.{number - 1}.{match[2]}"
            yield global_expert_name(name, ep_rank, num_local_experts), param


def is_tp_sharded(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def pad_vocab(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended to the vocabulary parameters up to megatron's padded size."""
    if name not in VOCAB_PARAMS or full.shape[0] == rows:
        return full
    if full.shape[0] > rows:
        raise ValueError(f"{name}: the HF vocabulary ({full.shape[0]}) exceeds the model's ({rows})")
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


def shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of the full megatron tensor `full` of parameter `param`."""
    if not is_tp_sharded(param) or tp == 1:
        return pad_vocab(name, full, param.shape[0])
    dim = param.partition_dim
    if dim == 0:
        full = pad_vocab(name, full, param.shape[0] * tp)
    if is_glu_fc1(name):
        return glu_shard(full, rank, tp)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def load_hf_weights(modules, adapter: HFAdapter, cfg: ModelConfig, hf_dir: str | Path) -> int:
    """Copy the HF checkpoint at `hf_dir` into this rank's parameters; returns how many were set.

    Every parameter of the module(s) must come from the checkpoint (a missing HF tensor is an
    error naming it); HF tensors no parameter asks for (e.g. another stage's layers) are not read.
    """
    reader = SafetensorsReader(hf_dir)
    count = 0
    for name, param in global_parameters(modules):
        tp, rank = shard_group_size_and_rank(name)  # routed experts: the expert-TP group
        if name in VOCAB_PARAMS and is_tp_sharded(param) and tp > 1:
            # the largest tensors: read only this rank's rows (adapters map them by renaming alone)
            rows = param.shape[0]
            read = partial(reader.read_rows, start=rank * rows, stop=(rank + 1) * rows)
            part = pad_vocab(name, adapter.from_hf(cfg, name, read), rows)
        else:
            part = shard(name, adapter.from_hf(cfg, name, reader.read), param, tp, rank)
        if part.shape != param.shape:
            raise ValueError(f"{hf_dir}: {name} has shape {tuple(part.shape)} on TP rank {rank}, "
                             f"the model's is {tuple(param.shape)} (config.json does not match the weights?)")
        param.copy_(part)
        count += 1
    return count
