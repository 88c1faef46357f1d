"""Our megatron-core GPTModel (local spec) <-> Hugging Face `LlamaForCausalLM` weights.

Why Llama: the tiny policy is that architecture (RMSNorm, SwiGLU, RoPE with rotate-half, no biases,
tied embeddings), so an HF export is a renaming plus two splits, and every HF tool (lm-eval,
vLLM, `generate`) can read the policy. Megatron-specific layouts handled here:

* `linear_qkv` fuses Q, K and V *per query group*: rows are [q heads of group 0, k_0, v_0,
  q heads of group 1, k_1, v_1, ...], each block `head_dim` rows.
* `linear_fc1` is [gate; up] (gated_linear_unit: silu(gate) * up).
* The vocabulary is padded (gpt.padded_vocab_size); the padded rows are masked out of every
  softmax, so `to_hf` trims them and `from_hf` refills them with zeros.
* RMSNorm epsilon: megatron's `layernorm_epsilon` default is 1e-5, HF LlamaConfig's 1e-6; the
  exported config carries megatron's value.

Only the TP=1 full state dict (`module.state_dict()` on one rank) is converted: a checkpoint of
any layout loads into a TP=1 policy first (dist checkpoints reshard on load).
"""

from __future__ import annotations

import torch

from nemo_rlsr.config import ModelConfig

_LAYER_NORMS = {"input_layernorm.weight": "input_layernorm.weight",
                "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
                "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
                "mlp.linear_fc2.weight": "mlp.down_proj.weight"}


def _heads(cfg: ModelConfig) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    return heads, groups, head_dim


def llama_config(cfg: ModelConfig, vocab_size: int, layernorm_epsilon: float = 1e-5, tokenizer=None):
    """The `LlamaConfig` of the policy; `vocab_size` is the true (unpadded) vocabulary."""
    from transformers import LlamaConfig

    heads, groups, head_dim = _heads(cfg)
    special = {}
    if tokenizer is not None:
        special = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id,
                   "eos_token_id": tokenizer.eos_id}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=heads, num_key_value_heads=groups,
        head_dim=head_dim, hidden_act="silu", max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=layernorm_epsilon, rope_theta=float(cfg.rotary_base),
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        torch_dtype="float32", **special,
    )


def to_hf(state_dict: dict, cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """megatron GPTModel state dict (TP=1) -> LlamaForCausalLM state dict (`_extra_state` dropped)."""
    heads, groups, head_dim = _heads(cfg)
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state_dict["embedding.word_embeddings.weight"][:vocab_size].clone(),
           "model.norm.weight": state_dict["decoder.final_layernorm.weight"].clone()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state_dict["output_layer.weight"][:vocab_size].clone()
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_NORMS.items():
            out[dst + theirs] = state_dict[src + ours].clone()
        qkv = state_dict[src + "self_attention.linear_qkv.weight"].view(groups, per_group + 2, head_dim, -1)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(heads * head_dim, -1).clone()
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(groups * head_dim, -1).clone()
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(groups * head_dim, -1).clone()
        gate, up = state_dict[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate.clone()
        out[dst + "mlp.up_proj.weight"] = up.clone()
    return out


def from_hf(hf_state_dict: dict, cfg: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict -> megatron GPTModel tensors (TP=1); padded vocab rows are zero.

    Load with `module.load_state_dict(sd, strict=False)`: only megatron's `_extra_state` entries
    (None for the local spec) are absent.
    """
    heads, groups, head_dim = _heads(cfg)

    def pad_vocab(weight: torch.Tensor) -> torch.Tensor:
        padded = weight.new_zeros(padded_vocab_size, weight.shape[1])
        padded[: weight.shape[0]] = weight
        return padded

    out = {"embedding.word_embeddings.weight": pad_vocab(hf_state_dict["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf_state_dict["model.norm.weight"].clone()}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = pad_vocab(hf_state_dict["lm_head.weight"])
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for ours, theirs in _LAYER_NORMS.items():
            out[dst + ours] = hf_state_dict[src + theirs].clone()
        q = hf_state_dict[src + "self_attn.q_proj.weight"].view(groups, heads // groups, head_dim, -1)
        k = hf_state_dict[src + "self_attn.k_proj.weight"].view(groups, 1, head_dim, -1)
        v = hf_state_dict[src + "self_attn.v_proj.weight"].view(groups, 1, head_dim, -1)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state_dict[src + "mlp.gate_proj.weight"], hf_state_dict[src + "mlp.up_proj.weight"]])
    return out
