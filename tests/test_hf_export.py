"""HF export: our megatron GPT and `LlamaForCausalLM` on the exported weights compute the same logits."""

import dataclasses

import pytest
import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.gpt import build_gpt, padded_vocab_size
from nemo_rlsr.models.hf_llama import from_hf, llama_config, to_hf
from nemo_rlsr.models.policy import attention_mask

VOCAB = 61  # padded to 128 by megatron: exercises the trim
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                  max_sequence_length=32, rotary_base=500)


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    module = build_gpt(CFG, VOCAB).eval()
    with torch.no_grad():  # megatron inits norms to 1: randomise them so a swapped norm would show
        for name, param in module.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5)
    return module


def hf_model(state, cfg=CFG, eps=1e-5):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(cfg, VOCAB, eps)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def test_hf_llama_logits_equal_megatron_logits(model):
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ours = model(ids, positions, attention_mask(torch.ones_like(ids, dtype=torch.bool)))[..., :VOCAB]
        hf = hf_model(to_hf(model.state_dict(), CFG, VOCAB))
        theirs = hf(input_ids=ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # HF's default epsilon (1e-6) is not megatron's: the config must carry ours
    with torch.no_grad():
        wrong_eps = hf_model(to_hf(model.state_dict(), CFG, VOCAB), eps=1e-6)(input_ids=ids).logits
    assert not torch.equal(wrong_eps, theirs)


def test_from_hf_inverts_to_hf_exactly(model):
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    back = from_hf(to_hf(state, CFG, VOCAB), CFG, padded_vocab_size(VOCAB, 1))
    assert set(back) == set(state)
    for key, tensor in state.items():
        if key == "embedding.word_embeddings.weight":
            assert torch.equal(back[key][:VOCAB], tensor[:VOCAB])
            assert not back[key][VOCAB:].any()  # padded rows (masked out everywhere) come back as 0
        else:
            assert torch.equal(back[key], tensor), key


def test_grouped_query_layout_round_trips():
    """With 2 query groups of 2 heads, q/k/v come out of megatron's per-group interleave."""
    cfg = dataclasses.replace(CFG, num_query_groups=2)
    heads, groups, dim, hidden = 4, 2, 16, 64
    # row r of the fused weight holds the value r: each block's rows are recognisable
    qkv = torch.arange((heads + 2 * groups) * dim, dtype=torch.float32)[:, None].expand(-1, hidden)
    state = {"embedding.word_embeddings.weight": torch.zeros(128, hidden),
             "decoder.final_layernorm.weight": torch.ones(hidden)}
    for i in range(cfg.num_layers):
        state |= {f"decoder.layers.{i}.self_attention.linear_qkv.weight": qkv,
                  f"decoder.layers.{i}.mlp.linear_fc1.weight": torch.randn(2 * 96, hidden),
                  **{f"decoder.layers.{i}.{k}": torch.randn(1) for k in
                     ["input_layernorm.weight", "pre_mlp_layernorm.weight",
                      "self_attention.linear_proj.weight", "mlp.linear_fc2.weight"]}}
    hf = to_hf(state, cfg, VOCAB)
    group_rows = (heads // groups + 2) * dim  # 64 rows per group: 2 q heads, k, v
    k = hf["model.layers.0.self_attn.k_proj.weight"][:, 0]
    assert k[:dim].tolist() == list(range(2 * dim, 3 * dim))
    assert k[dim:].tolist() == list(range(group_rows + 2 * dim, group_rows + 3 * dim))
    assert hf["model.layers.0.self_attn.q_proj.weight"].shape == (heads * dim, hidden)
    back = from_hf(hf, cfg, 128)
    assert all(torch.equal(back[key], value) for key, value in state.items())
