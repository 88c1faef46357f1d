"""Sliced HF reads (hf/shard_read.py): every TP-sharded parameter of every architecture, read as
slices of its HF tensors, equals the shard cut from the fully read tensor, and the TP ranks' reads
partition the HF bytes (nothing read twice, padding never read).

In one process: the parameters' megatron attributes (`partition_dim`) come from a TP=1 model, and a
TP=t rank's parameter is stood in for by its local shape, so TP=2 and TP=4 are checked for every
rank; TP=4 on a model with 2 KV heads is the case of fewer KV heads than TP ranks (a rank's fused
QKV rows cover part of a group). The multi-rank loads with their logits against transformers' and
their counted bytes per rank are in test_hf_architectures.py and test_hf_moe.py.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from test_hf_architectures import ARCHITECTURES, make_hf_checkpoint
from test_hf_moe import MODELS, save_hf

DENSE = sorted(ARCHITECTURES)
MOE = sorted(MODELS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sliced")
    dirs = {name: make_hf_checkpoint(name, root / "dense") for name in DENSE}
    return dirs | {name: save_hf(name, root / "moe")[1] for name in MOE}


def rank_param(param: torch.nn.Parameter, name: str, vocab: int, tp: int) -> SimpleNamespace:
    """A TP=`tp` rank's parameter (shape and megatron attributes) made from the TP=1 one."""
    from nemo_rlsr.models.gpt import padded_vocab_size
    from nemo_rlsr.models.hf.adapter import VOCAB_PARAMS

    shape = list(param.shape)
    if name in VOCAB_PARAMS:
        shape[0] = padded_vocab_size(vocab, tp)
    shape[param.partition_dim] //= tp
    return SimpleNamespace(shape=torch.Size(shape), partition_dim=param.partition_dim, tensor_model_parallel=True)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", DENSE + MOE)
def test_sliced_shards_equal_the_cut_of_full_tensors(name, tp, checkpoints, single_rank):
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.load import SafetensorsReader, global_parameters, is_tp_sharded, shard
    from nemo_rlsr.models.hf.shard_read import read_shard

    hf_dir = checkpoints[name]
    adapter, cfg = adapter_and_config(hf_dir)
    sharded = [(n, p) for n, p in global_parameters(build_gpt(cfg, cfg.vocab_size)) if is_tp_sharded(p)]
    assert any(".linear_qkv." in n or ".linear_q_up_proj." in n for n, _ in sharded)
    assert any("linear_fc2" in n for n, _ in sharded) and any(n == "embedding.word_embeddings.weight" for n, _ in sharded)
    for param_name, param in sharded:
        full_reader = SafetensorsReader(hf_dir)
        full = adapter.from_hf(cfg, param_name, full_reader.read)
        local = rank_param(param, param_name, cfg.vocab_size, tp)
        read_per_rank = []
        for rank in range(tp):
            reader = SafetensorsReader(hf_dir)
            cut = partial(shard, param_name, param=local, tp=tp, rank=rank)
            part = read_shard(reader, adapter, cfg, param_name, local.partition_dim, cut)
            assert part.shape == local.shape, param_name
            assert torch.equal(part, cut(full)), f"{param_name} TP rank {rank} of {tp}"
            read_per_rank.append(reader.bytes_read)
        assert sum(read_per_rank) == full_reader.bytes_read, (param_name, read_per_rank, full_reader.bytes_read)
        assert max(read_per_rank) < full_reader.bytes_read, param_name


def test_fewer_kv_heads_than_tp_ranks_is_exercised(checkpoints):
    """The TP=4 case above needs a checkpoint with fewer KV heads than 4."""
    from nemo_rlsr.models.hf import adapter_and_config

    assert adapter_and_config(checkpoints["qwen3"])[1].num_query_groups == 2


def test_reader_slices_along_rows_and_columns(tmp_path):
    from safetensors.torch import save_file

    from nemo_rlsr.models.hf.load import SafetensorsReader

    weight = torch.arange(24.0).reshape(4, 6)
    save_file({"w": weight}, tmp_path / "model.safetensors")
    reader = SafetensorsReader(tmp_path)
    assert reader.shape("w") == [4, 6]
    assert torch.equal(reader.read_slice("w", 1, 2, 5), weight[:, 2:5])
    assert torch.equal(reader.read_slice("w", 0, 1, 3), weight[1:3])
    assert reader.bytes_read == (12 + 12) * 4


def test_an_adapter_that_mixes_dims_is_refused(tmp_path):
    """shard_read relies on from_hf only renaming / reshaping / concatenating along the partition
    dim; a transposing adapter would scramble the traced positions and is refused instead."""
    from safetensors.torch import save_file

    from nemo_rlsr.models.hf.load import SafetensorsReader
    from nemo_rlsr.models.hf.shard_read import read_shard

    save_file({"w": torch.ones(4, 6)}, tmp_path / "model.safetensors")
    transposing = SimpleNamespace(from_hf=lambda cfg, name, read: read("w").t())
    with pytest.raises(ValueError, match="mixes dims other than the partition dim 0"):
        read_shard(SafetensorsReader(tmp_path), transposing, None, "x", 0, lambda full: full.chunk(2, dim=0)[0])
