"""HF safetensors -> this rank's megatron GPTModel, streaming tensor by tensor.

Every rank walks its OWN parameters (its pipeline stage's layers, its TP shard, its experts) and
reads from the safetensors files (memory-mapped) only what its shard holds: a replicated parameter
(norms, the router) whole through the adapter, a TP-sharded one as slices of the HF tensors behind
it (shard_read.py traces which rows or columns of which tensor the shard needs through the adapter's
own fusing). No rank reads another rank's slice, so the bytes a rank reads are about the
checkpoint's / TP (a 2 TB checkpoint at TP=8 is read once across a TP group, not 8 times), and no
process holds more than one parameter's slices besides its own shard. The reader counts the bytes
(`LoadStats.bytes_read`, logged at load); docs/hf_checkpoints.md.

* Layer names: a PP stage's module numbers its layers from 0; `layer_number` (1-based, global,
  megatron adds the stage's offset) gives the global index the HF names use.
* TP: `tensor_model_parallel` / `partition_dim` are the parameter's own megatron attributes; fc1
  under GLU is sharded as [gate_shard; up_shard] (fused.glu_shard), not as rows of [gate; up];
  `shard` says how, shard_read.py turns that into the HF slices a rank reads.
* Vocabulary: megatron's embedding/output rows are padded (gpt.padded_vocab_size); the padded
  rows are zero (they are masked out of every softmax, and never read).
* Experts: a rank builds only its EP rank's experts (global indices, expert_parallel.py), so it
  reads no other expert's tensors; each expert is split over the expert-TP group.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import LAYER, VOCAB_PARAMS, HFAdapter
from nemo_rlsr.models.hf.expert_parallel import ep_size_and_rank, global_expert_name, shard_group_size_and_rank
from nemo_rlsr.models.hf.fused import glu_shard, is_glu_fc1
from nemo_rlsr.models.hf.moe_mlp import CHECKPOINT_BUFFERS
from nemo_rlsr.models.hf.shard_read import read_shard

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadStats:
    """What one rank's `load_hf_weights` did: parameters set, checkpoint bytes read."""

    parameters: int
    bytes_read: int


class SafetensorsReader:
    """Lazy tensor reads from an HF checkpoint directory (sharded with an index, or one file).

    Each file is opened once (safetensors memory-maps it); `read` copies out one tensor.
    `bytes_read` counts the bytes of every tensor and slice copied out: what this rank pulled from
    the checkpoint (logged at load, and what the load tests check per rank).
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
        self.bytes_read = 0

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir}: no tensor {name!r} in the checkpoint")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.hf_dir / file, framework="pt")
        return self._handles[file]

    def _counted(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read(self, name: str) -> torch.Tensor:
        return self._counted(self._handle(name).get_tensor(name))

    def shape(self, name: str) -> list[int]:
        """The tensor's shape, from the file's header (no data read)."""
        return self._handle(name).get_slice(name).get_shape()

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of one tensor along `dim`, reading only those bytes."""
        part = self._handle(name).get_slice(name)
        return self._counted(part[(slice(None),) * dim + (slice(start, stop),)])


class TensorDictReader:
    """The reader interface over full HF tensors already in memory (a refit received from the
    trainer: weight_sync/broadcast.py), so they load through the same code as a checkpoint."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "received weights") -> None:
        self.tensors, self.hf_dir, self.bytes_read = tensors, label, 0

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.hf_dir}: no tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        tensor = self._get(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def shape(self, name: str) -> list[int]:
        return list(self._get(name).shape)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        part = self._get(name).narrow(dim, start, stop - start)
        self.bytes_read += part.numel() * part.element_size()
        return part


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
    """This TP rank's part of the full megatron tensor `full` of the TP-sharded parameter `param`
    (applied to the index tensors of shard_read.py: it decides which HF rows a rank reads)."""
    dim = param.partition_dim
    if dim == 0:
        full = pad_vocab(name, full, param.shape[0] * tp)
    if is_glu_fc1(name):
        return glu_shard(full, rank, tp)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def load_hf_weights(modules, adapter: HFAdapter, cfg: ModelConfig,
                    source: str | Path | SafetensorsReader | TensorDictReader) -> LoadStats:
    """Copy the HF checkpoint at `source` (a directory, or a reader) into this rank's parameters;
    returns how many were set and how many bytes this rank read (also logged).

    Every parameter of the module(s) must come from the checkpoint (a missing HF tensor is an
    error naming it); HF tensors no parameter asks for (e.g. another stage's layers) are not read.
    """
    reader = source if isinstance(source, (SafetensorsReader, TensorDictReader)) else SafetensorsReader(source)
    hf_dir = reader.hf_dir
    count = 0
    for name, param in global_parameters(modules):
        tp, rank = shard_group_size_and_rank(name)  # routed experts: the expert-TP group
        if is_tp_sharded(param) and tp > 1:  # read only this rank's slices of the HF tensors
            cut = partial(shard, name, param=param, tp=tp, rank=rank)
            part = read_shard(reader, adapter, cfg, name, param.partition_dim, cut)
        else:
            part = pad_vocab(name, adapter.from_hf(cfg, name, reader.read), param.shape[0])
        if part.shape != param.shape:
            raise ValueError(f"{hf_dir}: {name} has shape {tuple(part.shape)} on TP rank {rank}, "
                             f"the model's is {tuple(param.shape)} (config.json does not match the weights?)")
        param.copy_(part)
        count += 1
    stats = LoadStats(parameters=count, bytes_read=reader.bytes_read)
    logger.info("%s: rank %d read %d bytes for %d parameters", hf_dir, _global_rank(), stats.bytes_read, count)
    return stats


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
