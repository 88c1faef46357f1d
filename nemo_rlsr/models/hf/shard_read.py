"""Read only a rank's slice of the HF tensors behind one TP-sharded megatron parameter.

Without this every TP rank reads every full tensor of its stage and cuts its shard out: TP-fold
read amplification (a 2 TB checkpoint read 8 times at TP=8). The slice a rank needs is not always
a plain chunk of one HF tensor: megatron's fused QKV interleaves q, k and v per query group, fc1
under a GLU is [gate_shard; up_shard], vocabulary rows are padded, and with fewer KV heads than TP
ranks a rank's contiguous rows of the fused QKV cover part of a group (megatron-core's attention
then all-gathers and picks its group: megatron/core/transformer/attention.py, 0.16.1).

Rather than repeat each of those layouts here, the shard is traced through the adapter itself:
`adapter.from_hf` runs once on *index tensors*, where `read(hf_name)` returns, in place of the
data, a tensor numbering the HF tensor's positions along the partition dim (size 1 in every other
dim). The same `cut` that would take the rank's shard out of the full tensor (load.shard, padding
included) takes it out of the index tensor, which then says for each of the rank's rows (or
columns) which HF tensor and which position it comes from, 0 standing for a padding row. Each HF
tensor is then read once, as the range from its first to its last needed position
(safetensors `get_slice`), and the shard is assembled by `index_select`.

This holds for any adapter whose `from_hf` only renames, reshapes and concatenates along the
partition dim (see adapter.py); the load tests compare every architecture's sliced shards with the
cut of the full tensors and the loaded logits with transformers'.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import HFAdapter

# index code = source * _STRIDE + position + 1; 0 is a padding row (zeros, read from nowhere)
_STRIDE = 1 << 40


class SliceReader(Protocol):
    def shape(self, name: str) -> list[int]: ...

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


def trace_positions(adapter: HFAdapter, cfg: ModelConfig, name: str, shape: Callable[[str], list[int]], dim: int,
                    cut: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """(HF tensors `from_hf` reads for `name`, in call order; one index code per shard position
    along `dim`) of the shard `cut` takes out of the full megatron tensor."""
    sources: list[str] = []

    def index_read(hf_name: str) -> torch.Tensor:
        size = list(shape(hf_name))
        if dim >= len(size):
            raise ValueError(f"{name}: partition dim {dim} but HF tensor {hf_name} has shape {size}")
        codes = torch.arange(1, size[dim] + 1, dtype=torch.int64) + len(sources) * _STRIDE
        sources.append(hf_name)
        return codes.reshape([size[dim] if axis == dim else 1 for axis in range(len(size))])

    codes = cut(adapter.from_hf(cfg, name, index_read))
    if codes.numel() != codes.shape[dim]:
        raise ValueError(f"{name}: the adapter mixes dims other than the partition dim {dim}; "
                         "its shard cannot be read as slices")
    return sources, codes.reshape(-1)


def read_shard(reader: SliceReader, adapter: HFAdapter, cfg: ModelConfig, name: str, dim: int,
               cut: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """This rank's shard of megatron parameter `name` (split along `dim`; `cut`: full -> shard),
    reading from each HF tensor only the range of positions the shard holds."""
    sources, codes = trace_positions(adapter, cfg, name, reader.shape, dim, cut)
    padding = codes == 0
    source = torch.where(padding, -1, (codes - 1) // _STRIDE)
    position = (codes - 1) % _STRIDE
    pieces, pool_index, offset = [], torch.zeros_like(codes), 0
    for number, hf_name in enumerate(sources):
        mine = source == number
        if not mine.any():
            continue
        first, last = int(position[mine].min()), int(position[mine].max())
        pieces.append(reader.read_slice(hf_name, dim, first, last + 1))
        pool_index[mine] = offset + position[mine] - first
        offset += last + 1 - first
    template = pieces[0] if pieces else reader.read_slice(sources[0], dim, 0, 0)
    zero_shape = list(template.shape)
    zero_shape[dim] = 1
    pool_index[padding] = offset  # the zero row appended below
    pool = torch.cat(pieces + [template.new_zeros(zero_shape)], dim=dim)
    return pool.index_select(dim, pool_index)
