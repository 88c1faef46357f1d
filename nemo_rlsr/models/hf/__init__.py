"""Hugging Face checkpoints <-> our megatron-core GPTModel, one adapter per architecture family.

An adapter (see `adapter.HFAdapter`) knows three things about one HF `model_type`: how its
`config.json` maps to our `ModelConfig` and back, and how each megatron parameter (full, unsharded,
global layer index) is built from HF tensors and split back into them. Everything about ranks,
shards and files lives in `load.py` (HF -> megatron, streaming, each rank reads its own shard)
and `save.py` (megatron -> HF, gathering TP shards, streaming safetensors shards + index).

Adding an architecture: a module with an adapter instance and one line in `_REGISTRY`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from nemo_rlsr.models.hf.adapter import HFAdapter

# model_type (config.json) -> "module:attribute" of its adapter; imported on first use.
_REGISTRY = {
    "llama": "nemo_rlsr.models.hf.llama:ADAPTER",
    "qwen2": "nemo_rlsr.models.hf.qwen2:ADAPTER",
    "qwen3": "nemo_rlsr.models.hf.qwen3:ADAPTER",
    "qwen3_moe": "nemo_rlsr.models.hf.qwen3_moe:ADAPTER",
    "deepseek_v3": "nemo_rlsr.models.hf.deepseek_v3:ADAPTER",
    # Kimi-K2's config.json says "kimi_k2" for the DeepSeek-V3 layout (its model card: engines without a
    # kimi_k2 entry run it as deepseek_v3); read as DeepSeek-V3 and written back (export, refit) as one
    "kimi_k2": "nemo_rlsr.models.hf.deepseek_v3:ADAPTER",
}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model_type: str) -> HFAdapter:
    """The adapter of an HF `model_type`; an unknown one is an error naming the supported ones."""
    if model_type not in _REGISTRY:
        raise ValueError(f"HF model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(supported_model_types())}")
    module, attribute = _REGISTRY[model_type].split(":")
    return getattr(importlib.import_module(module), attribute)


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (model.hf_path must be a local HF checkpoint directory)")
    return json.loads(path.read_text())


def adapter_and_config(hf_dir: str | Path):
    """(adapter, ModelConfig) of the HF checkpoint directory `hf_dir` (reads only config.json)."""
    hf_config = read_hf_config(hf_dir)
    if "model_type" not in hf_config:
        raise ValueError(f"{hf_dir}/config.json has no model_type; supported: {', '.join(supported_model_types())}")
    adapter = adapter_for(hf_config["model_type"])
    return adapter, adapter.model_config(hf_config)


def adapter_for_model(cfg) -> HFAdapter:
    """The HF architecture a trained policy (ModelConfig `cfg`) is exported as: the checkpoint's own
    `model_type` when `cfg.hf_path` is still there, else the dense family its shape belongs to
    (qk-norm: Qwen3, qkv bias: Qwen2, neither: Llama, which the tiny CPU policy is)."""
    if cfg.hf_path and (Path(cfg.hf_path) / "config.json").is_file():
        return adapter_for(read_hf_config(cfg.hf_path)["model_type"])
    if cfg.num_moe_experts or cfg.multi_latent_attention:
        raise ValueError("an MoE / MLA policy is exported with its model.hf_path's config.json (not found)")
    return adapter_for("qwen3" if cfg.qk_layernorm else "qwen2" if cfg.add_qkv_bias else "llama")
