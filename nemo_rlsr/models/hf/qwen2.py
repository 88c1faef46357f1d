"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): the dense decoder with a bias on q, k and v (not on o_proj);
the small ones tie the embeddings."""

from __future__ import annotations

import dataclasses

from nemo_rlsr.models.hf.adapter import DenseAdapter, require


class Qwen2Adapter(DenseAdapter):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"

    def model_config(self, hf_config: dict):
        require(hf_config, "use_sliding_window", (False,), False)
        return dataclasses.replace(super().model_config(hf_config), add_qkv_bias=True)

    def hf_config(self, cfg):
        config = super().hf_config(cfg)
        del config["attention_bias"], config["mlp_bias"]  # Qwen2's q/k/v bias is not configurable
        return config | {"use_sliding_window": False}


ADAPTER = Qwen2Adapter()
