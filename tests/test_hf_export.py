"""HF export of our own policy: megatron GPT -> save.py -> `LlamaForCausalLM` computes the same
logits, load.py brings it back bit for bit, and the fused layouts split as megatron lays them out."""

import dataclasses
import json

import pytest
import torch

from distributed_helpers import random_tiny_gpt
from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.gpt import build_gpt
from nemo_rlsr.models.hf import adapter_for_model
from nemo_rlsr.models.hf.fused import fuse_qkv, glu_shard, glu_unshard, split_qkv
from nemo_rlsr.models.hf.load import load_hf_weights
from nemo_rlsr.models.hf.save import save_hf_checkpoint
from nemo_rlsr.models.policy import attention_mask

VOCAB = 61  # padded to 128 by megatron: exercises the trim
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                  max_sequence_length=32, rotary_base=500, vocab_size=VOCAB)


def logits(module, ids):
    with torch.no_grad():
        return module(ids, torch.arange(ids.shape[1]).expand_as(ids),
                      attention_mask(torch.ones_like(ids, dtype=torch.bool)))[..., :VOCAB]


def test_exported_llama_has_our_logits_and_loads_back_exactly(single_rank, tmp_path):
    from transformers import LlamaForCausalLM

    model = random_tiny_gpt(CFG, VOCAB)
    adapter = adapter_for_model(CFG)
    assert adapter.model_type == "llama"
    save_hf_checkpoint(model, adapter, CFG, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rms_norm_eps"] == 1e-5  # megatron's, not HF's 1e-6
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)

    back = build_gpt(CFG, VOCAB).eval()
    load_hf_weights(back, adapter, CFG, tmp_path)
    state, restored = model.state_dict(), back.state_dict()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if key == "embedding.word_embeddings.weight":
            assert torch.equal(restored[key][:VOCAB], tensor[:VOCAB])
            assert not restored[key][VOCAB:].any()  # padded rows (masked out everywhere) come back as 0
        else:
            assert torch.equal(restored[key], tensor), key


def test_export_picks_the_architecture_of_the_policy_shape():
    assert adapter_for_model(dataclasses.replace(CFG, add_qkv_bias=True)).model_type == "qwen2"
    assert adapter_for_model(dataclasses.replace(CFG, qk_layernorm=True)).model_type == "qwen3"


def test_grouped_query_layout_matches_megatron_interleave():
    """With 2 query groups of 2 heads, rows are [q0 q1 k0 v0 | q2 q3 k1 v1] per group."""
    heads, groups, dim, hidden = 4, 2, 16, 8
    qkv = torch.arange((heads + 2 * groups) * dim, dtype=torch.float32)[:, None].expand(-1, hidden)
    q, k, v = split_qkv(qkv, heads, groups, dim)
    group_rows = (heads // groups + 2) * dim
    assert k[:, 0].tolist() == list(range(2 * dim, 3 * dim)) + list(range(group_rows + 2 * dim, group_rows + 3 * dim))
    assert q.shape == (heads * dim, hidden) and v.shape == (groups * dim, hidden)
    assert torch.equal(fuse_qkv(q, k, v, groups, dim), qkv)
    bias = qkv[:, 0]  # biases (1-D) follow the same layout
    assert torch.equal(fuse_qkv(*split_qkv(bias, heads, groups, dim), groups, dim), bias)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glu_shards_hold_their_part_of_gate_and_up(tp):
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    full = torch.cat([gate, up])
    shards = [glu_shard(full, rank, tp) for rank in range(tp)]
    assert torch.equal(shards[-1], torch.cat([gate.chunk(tp)[-1], up.chunk(tp)[-1]]))
    assert torch.equal(glu_unshard(shards), full)
