"""Refit of policies started from HF checkpoints: what a rollout engine is given is the policy's own
architecture.

Checkpoints written by transformers (random weights; tests/test_hf_architectures.py and
tests/test_hf_moe.py build them): Llama-3 (RoPE scaling), Qwen2 (qkv bias), Qwen3 (qk-norm),
Qwen3-MoE, DeepSeek-V3 (MLA, sigmoid router, shared expert) and a DeepSeek-V3 one labelled
`kimi_k2` as Kimi-K2's are. The policy is built and loaded the trainer's way (`with_hf_model`,
`MegatronPolicy`, `load_hf_policy`); its refit stream and the config.json the TensorRT-LLM engine
gets (`generation.factory.trtllm_model_config`, the function the engine path writes it with) are
loaded into the transformers class that config.json names, nothing missing or left over, and that
model's logits equal our megatron logits and the original checkpoint's.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_worker import input_ids
from test_hf_architectures import make_hf_checkpoint
from test_hf_moe import save_hf
from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.models.policy import attention_mask

PAD, EOS = 0, 1


def dense(name, root):
    """(checkpoint directory, the transformers model it holds)."""
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_checkpoint(name, root)
    return hf_dir, AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def moe(name, root):
    model, hf_dir = save_hf(name, root)
    return hf_dir, model


def kimi_k2(name, root):
    """A DeepSeek-V3 checkpoint labelled `model_type: kimi_k2` in config.json, as Kimi-K2's are."""
    model, hf_dir = save_hf("deepseek_v3", root)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    return hf_dir, model


# name -> (writer of the HF checkpoint, transformers class the engine must get, ids the tokenizer lacks)
CASES = {
    "llama3": (dense, "LlamaForCausalLM", 0),  # RoPE base 500000, "llama3" scaling
    "qwen2": (dense, "Qwen2ForCausalLM", 0),
    # RoPE base 1e6; Qwen's tokenizers have fewer ids than embedding rows (151665 of 151936): the
    # refit and the engine's config.json carry the tokenizer's rows only
    "qwen2_tied": (dense, "Qwen2ForCausalLM", 11),
    "qwen3": (dense, "Qwen3ForCausalLM", 0),
    "qwen3_moe": (moe, "Qwen3MoeForCausalLM", 0),
    "deepseek_v3": (moe, "DeepseekV3ForCausalLM", 0),
    "kimi_k2": (kimi_k2, "DeepseekV3ForCausalLM", 0),
}


def trainer_policy(hf_dir, ctx):
    """The policy as RLSRTrainer builds it from `model.hf_path` (shape from config.json, then weights)."""
    from nemo_rlsr.models.hf.start import load_hf_policy, with_hf_model
    from nemo_rlsr.models.policy import MegatronPolicy

    cfg = RLSRConfig()
    cfg.model.hf_path = str(hf_dir)
    cfg.data.tokenizer_path = str(hf_dir)  # only checked to be set: nothing here tokenizes
    cfg = with_hf_model(cfg)
    policy = MegatronPolicy(cfg.model, None, cfg.model.vocab_size, ctx)
    load_hf_policy(policy, cfg.model, cfg.model.vocab_size)
    return cfg.model, policy


def engine_view(policy, model_cfg, vocab: int):
    """(config.json, {HF name: tensor}) exactly as the TensorRT-LLM engine path produces them."""
    from nemo_rlsr.generation.factory import trtllm_model_config
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    config = trtllm_model_config(policy.hf_adapter, model_cfg, vocab, PAD, EOS)
    stream = {name: tensor.clone()
              for name, tensor in hf_named_tensors(policy.chunks, policy.hf_adapter, model_cfg, vocab)}
    return config, stream


def load_into_transformers(config: dict, stream: dict[str, torch.Tensor], folder):
    """The model an engine would build from a folder holding this config.json and these tensors: the
    class `architectures` names, loaded by transformers (which maps checkpoint names onto its modules,
    e.g. per-expert tensors into its fused MoE parameters, as for a hub checkpoint). Every tensor
    must be used and every parameter filled."""
    import transformers
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(stream, folder / "model.safetensors", metadata={"format": "pt"})
    model_class = getattr(transformers, config["architectures"][0])
    model, info = model_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_refit_stream_and_engine_config_load_into_the_matching_transformers_class(name, single_rank, tmp_path):
    write, expected_class, short = CASES[name]
    hf_dir, original_model = write(name, tmp_path)
    model_cfg, policy = trainer_policy(hf_dir, single_rank)
    vocab = model_cfg.vocab_size - short
    config, stream = engine_view(policy, model_cfg, vocab)
    assert config["architectures"] == [expected_class]
    assert (config["vocab_size"], config["pad_token_id"], config["eos_token_id"]) == (vocab, PAD, EOS)
    assert stream["model.embed_tokens.weight"].shape[0] == vocab

    ids = input_ids(vocab)
    with torch.no_grad():
        ours = policy.module.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids),
                                    attention_mask(torch.ones_like(ids, dtype=torch.bool)))[..., :vocab]
        refitted = load_into_transformers(config, stream, tmp_path / "engine_model")
        assert type(refitted).__name__ == expected_class
        refitted_logits = refitted(input_ids=ids).logits
        # TensorRT-LLM 1.2 reads config.json with transformers 4.57 (its requirements.txt pins 4.57.1), whose
        # configs know `rope_theta` + `rope_scaling` and ignore transformers 5's `rope_parameters`
        # (transformers 4.57.1 models/*/configuration_*.py): that reading must build the same model
        legacy = {key: value for key, value in config.items() if key != "rope_parameters"}
        legacy_logits = load_into_transformers(legacy, stream, tmp_path / "legacy_model")(input_ids=ids).logits
        original = original_model.eval()(input_ids=ids).logits
    assert ours.std() > 0.1  # something to compare
    torch.testing.assert_close(refitted_logits, ours, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(legacy_logits, ours, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours, original[..., :vocab], atol=2e-5, rtol=1e-5)


def test_quantized_checkpoints_are_refused(tmp_path):
    """A block-FP8 release (DeepSeek-V3, Kimi-K2) would be copied into the policy without its scales."""
    from nemo_rlsr.models.hf import adapter_and_config

    hf_dir, _ = kimi_k2("kimi_k2", tmp_path)
    adapter, _ = adapter_and_config(hf_dir)
    assert adapter.model_type == "deepseek_v3"
    config = json.loads((hf_dir / "config.json").read_text())
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (hf_dir / "config.json").write_text(json.dumps({**config, "quantization_config": fp8}))
    with pytest.raises(ValueError, match="quantization_config"):
        adapter_and_config(hf_dir)
