"""The adapter interface, and the dense decoder (Llama / Qwen2 / Qwen3) every adapter shares.

An adapter maps names and shapes only, on FULL tensors (no TP shards) with GLOBAL layer indices:

* `model_config(hf_config) -> ModelConfig` and `hf_config(cfg) -> dict` (config.json for export);
* `from_hf(cfg, megatron_name, read) -> tensor`: the full megatron parameter, `read(hf_name)`
  loading one HF tensor lazily (so a loader touches only what the parameter needs);
* `to_hf(cfg, megatron_name, tensor) -> {hf_name: tensor}`: the inverse (empty for a parameter HF
  does not store, e.g. the output layer of tied embeddings).

The vocabulary padding of the embedding/output rows is not the adapter's business: `from_hf`
returns the HF row count and `to_hf` receives the trimmed rows (load.py / save.py pad and trim).
`from_hf` may only rename HF tensors and reshape / concatenate them along a TP-sharded parameter's
partition dim (no arithmetic, no transposes): the loader runs it on index tensors to find which
slices of which HF tensors a TP rank's shard needs, and reads only those (shard_read.py).
MoE adapters subclass `DenseAdapter` and extend `layer_from_hf` / `layer_to_hf` for their MLPs.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.fused import fuse_glu, fuse_qkv, split_glu, split_qkv

Read = Callable[[str], torch.Tensor]
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# megatron parameters that are vocabulary rows (padded by megatron, trimmed in HF)
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")

# one-to-one per-layer tensors: megatron suffix -> HF suffix. The `layer_norm_weight` names are
# the Transformer Engine spec's (norms fused into the next linear); the others the local spec's.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def head_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(attention heads, query groups, head dim) with megatron's defaults filled in."""
    heads = cfg.num_attention_heads
    return heads, cfg.num_query_groups or heads, cfg.kv_channels or cfg.hidden_size // heads


def rope_fields(hf_config: dict) -> dict:
    """ModelConfig RoPE fields from transformers 5 `rope_parameters` or the older `rope_theta` +
    `rope_scaling` keys. The plain, Llama-3 ("llama3") and YaRN ("yarn") rotary embeddings are built."""
    params = dict(hf_config.get("rope_parameters") or {})
    legacy = hf_config.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields = {"rotary_base": int(theta), "rotary_percent": float(hf_config.get("partial_rotary_factor", 1.0))}
    if float(theta) != int(theta):
        raise ValueError(f"rope_theta={theta} is not an integer (model.rotary_base is)")
    if rope_type == "llama3":
        fields |= {"rope_scaling_factor": float(params["factor"]),
                   "rope_low_freq_factor": float(params["low_freq_factor"]),
                   "rope_high_freq_factor": float(params["high_freq_factor"]),
                   "rope_original_max_position": int(params["original_max_position_embeddings"])}
    elif rope_type == "yarn":
        fields |= yarn_fields(params, hf_config)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3, yarn)")
    return fields


def yarn_fields(params: dict, hf_config: dict) -> dict:
    """ModelConfig YaRN fields with transformers' defaults: the original context is a top-level
    `original_max_position_embeddings` (Phi-3 style), else the rope parameters', else
    `max_position_embeddings`; a missing factor is max_position_embeddings / original context;
    beta_fast / beta_slow 32 / 1. A given `attention_factor` and `truncate: false` are refused
    (megatron derives the cos/sin factor itself and always rounds the ramp bounds)."""
    if params.get("attention_factor") is not None:
        raise ValueError(f"YaRN attention_factor={params['attention_factor']} is not supported (megatron derives "
                         "it from factor, mscale and mscale_all_dim)")
    require(params, "truncate", (True,), True)
    original = (hf_config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                or hf_config["max_position_embeddings"])
    factor = params.get("factor") or hf_config["max_position_embeddings"] / original
    optional = {key: None if params.get(key) is None else float(params[key]) for key in ("mscale", "mscale_all_dim")}
    return {"yarn_scaling_factor": float(factor), "yarn_original_max_position": int(original),
            "yarn_beta_fast": float(params.get("beta_fast") or 32), "yarn_beta_slow": float(params.get("beta_slow") or 1),
            "yarn_mscale": optional["mscale"], "yarn_mscale_all_dim": optional["mscale_all_dim"]}


def rope_config(cfg: ModelConfig) -> dict:
    """Inverse of `rope_fields`, in transformers 5's `rope_parameters` and also in the `rope_theta` +
    `rope_scaling` keys transformers 4.x reads: TensorRT-LLM 1.2 loads config.json with transformers
    4.57 (its requirements.txt pins 4.57.1), whose configs ignore `rope_parameters` and would fall
    back to RoPE base 10000 without them. transformers 5 reads either form."""
    params = {"rope_theta": float(cfg.rotary_base), "rope_type": "default"}
    if cfg.rope_scaling_factor is not None:
        params |= {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_position}
    if cfg.yarn_scaling_factor is not None:
        params |= {"rope_type": "yarn", "factor": cfg.yarn_scaling_factor,
                   "original_max_position_embeddings": cfg.yarn_original_max_position,
                   "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
        params |= {key: value for key, value in (("mscale", cfg.yarn_mscale), ("mscale_all_dim", cfg.yarn_mscale_all_dim))
                   if value is not None}
    out = {"rope_parameters": params, "rope_theta": params["rope_theta"]}
    if params["rope_type"] != "default":
        out["rope_scaling"] = {key: value for key, value in params.items() if key != "rope_theta"}
    if cfg.rotary_percent != 1.0:
        out["partial_rotary_factor"] = cfg.rotary_percent
    return out


def require(hf_config: dict, key: str, allowed, default) -> None:
    """Refuse a config.json feature our megatron model does not build (instead of ignoring it)."""
    value = hf_config.get(key, default)
    if value not in allowed:
        raise ValueError(f"config.json {key}={value!r} is not supported (supported: {allowed!r})")


class HFAdapter:
    """Interface of one HF architecture family (see the module docstring)."""

    model_type: str
    architecture: str

    def model_config(self, hf_config: dict) -> ModelConfig:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig) -> dict:
        raise NotImplementedError

    def from_hf(self, cfg: ModelConfig, megatron_name: str, read: Read) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, cfg: ModelConfig, megatron_name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class DenseAdapter(HFAdapter):
    """Llama-style decoder: RMSNorm, RoPE (rotate-half), GQA, SwiGLU; optional qkv bias, qk-norm."""

    def model_config(self, hf_config: dict) -> ModelConfig:
        # quantized weights (e.g. the block-FP8 DeepSeek-V3 / Kimi-K2 releases) would be copied into the
        # policy without their scales: a bf16 / fp32 copy of the checkpoint is needed
        require(hf_config, "quantization_config", (None,), None)
        require(hf_config, "hidden_act", ("silu",), "silu")
        require(hf_config, "mlp_bias", (False,), False)
        heads = hf_config["num_attention_heads"]
        return ModelConfig(
            num_layers=hf_config["num_hidden_layers"], hidden_size=hf_config["hidden_size"],
            num_attention_heads=heads, ffn_hidden_size=hf_config["intermediate_size"],
            max_sequence_length=hf_config["max_position_embeddings"],
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            vocab_size=hf_config["vocab_size"],
            num_query_groups=hf_config.get("num_key_value_heads") or heads,
            kv_channels=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            layernorm_epsilon=float(hf_config["rms_norm_eps"]),
            **rope_fields(hf_config),
        )

    def hf_config(self, cfg: ModelConfig) -> dict:
        if cfg.vocab_size is None:
            raise ValueError("hf_config needs cfg.vocab_size (the true, unpadded vocabulary)")
        heads, groups, head_dim = head_shape(cfg)
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_sequence_length,
            "rms_norm_eps": cfg.layernorm_epsilon, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": cfg.add_qkv_bias, "mlp_bias": False, "dtype": cfg.params_dtype,
            **rope_config(cfg),
        }

    def from_hf(self, cfg: ModelConfig, megatron_name: str, read: Read) -> torch.Tensor:
        if megatron_name == "embedding.word_embeddings.weight":
            return read("model.embed_tokens.weight")
        if megatron_name == "output_layer.weight":  # tied: the last PP stage's copy of the embedding
            return read("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
        if megatron_name == "decoder.final_layernorm.weight":
            return read("model.norm.weight")
        match = LAYER.match(megatron_name)
        if match is None:
            raise KeyError(f"{type(self).__name__}: no HF tensor for megatron parameter {megatron_name!r}")
        return self.layer_from_hf(cfg, match[2], lambda name: read(f"model.layers.{match[1]}.{name}"))

    def to_hf(self, cfg: ModelConfig, megatron_name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if megatron_name == "embedding.word_embeddings.weight":
            return {"model.embed_tokens.weight": tensor}
        if megatron_name == "output_layer.weight":
            return {} if cfg.tie_embeddings else {"lm_head.weight": tensor}
        if megatron_name == "decoder.final_layernorm.weight":
            return {"model.norm.weight": tensor}
        match = LAYER.match(megatron_name)
        if match is None:
            raise KeyError(f"{type(self).__name__}: no HF name for megatron parameter {megatron_name!r}")
        return {f"model.layers.{match[1]}.{name}": value
                for name, value in self.layer_to_hf(cfg, match[2], tensor).items()}

    def layer_from_hf(self, cfg: ModelConfig, suffix: str, read: Read) -> torch.Tensor:
        """One layer's megatron tensor `suffix` (e.g. "mlp.linear_fc1.weight"); `read` is layer-local."""
        if suffix in _LAYER_RENAMES:
            return read(_LAYER_RENAMES[suffix])
        if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            _, groups, head_dim = head_shape(cfg)
            kind = suffix.rsplit(".", 1)[1]
            return fuse_qkv(*(read(f"self_attn.{p}_proj.{kind}") for p in "qkv"), groups, head_dim)
        if suffix == "mlp.linear_fc1.weight":
            return fuse_glu(read("mlp.gate_proj.weight"), read("mlp.up_proj.weight"))
        raise KeyError(f"{type(self).__name__}: no HF tensor for layer parameter {suffix!r}")

    def layer_to_hf(self, cfg: ModelConfig, suffix: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if suffix in _LAYER_RENAMES:
            return {_LAYER_RENAMES[suffix]: tensor}
        if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = suffix.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, *head_shape(cfg))
            return {f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k, f"self_attn.v_proj.{kind}": v}
        if suffix == "mlp.linear_fc1.weight":
            gate, up = split_glu(tensor)
            return {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up}
        raise KeyError(f"{type(self).__name__}: no HF name for layer parameter {suffix!r}")
