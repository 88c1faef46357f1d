"""Llama 2 / 3.x (`LlamaForCausalLM`): the plain dense decoder, Llama-3 RoPE scaling in the config."""

from __future__ import annotations

from nemo_rlsr.models.hf.adapter import DenseAdapter, require


class LlamaAdapter(DenseAdapter):
    model_type = "llama"
    architecture = "LlamaForCausalLM"

    def model_config(self, hf_config: dict):
        # Llama's attention_bias also adds an o_proj bias, which our layers do not have.
        require(hf_config, "attention_bias", (False,), False)
        return super().model_config(hf_config)


ADAPTER = LlamaAdapter()
