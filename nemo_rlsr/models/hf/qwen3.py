"""Qwen3 (`Qwen3ForCausalLM`): the dense decoder with RMSNorm over each q and k head (qk-norm),
no qkv bias, head_dim independent of hidden_size."""

from __future__ import annotations

import dataclasses

from nemo_rlsr.models.hf.adapter import DenseAdapter, require


class Qwen3Adapter(DenseAdapter):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"

    def model_config(self, hf_config: dict):
        # Qwen3's attention_bias would also add an o_proj bias, which our layers do not have.
        require(hf_config, "attention_bias", (False,), False)
        require(hf_config, "use_sliding_window", (False,), False)
        return dataclasses.replace(super().model_config(hf_config), qk_layernorm=True)

    def hf_config(self, cfg):
        return super().hf_config(cfg) | {"use_sliding_window": False}


ADAPTER = Qwen3Adapter()
