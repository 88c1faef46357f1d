"""YaRN RoPE scaling and MLA without a q latent: HF checkpoints -> our megatron model -> HF.

References are transformers' own models (random weights from configs, saved sharded): our model is
built from config.json alone (hf/load.py) and must give transformers' logits (fp32, TP=1), export
every tensor back bit for bit, and write a config.json that reads back to the same ModelConfig and
builds the same HF model. Each YaRN setting is also dropped or altered on our side to show the
logits then move away from transformers' (the comparison can fail). Also: the KV-cache sampler's
logprobs, and logits / export at TP=2 and PP=2 (yarn_worker.py, 2 gloo ranks).

The YaRN configs use a small original context (8 positions, 13-token inputs), a small rope_theta and
small betas, so the ramp between kept (extrapolated) and interpolated frequencies depends on both
betas: of DeepSeek's 4 rope frequencies 2 are kept and 2 blended; of Qwen2's 8, 3 kept, 4 blended,
1 interpolated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_hf_moe import ATOL, VOCAB, _randomize, assert_same_tensors, deepseek_v3
from nemo_rlsr.models.policy import attention_mask

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7))
YARN = {"rope_type": "yarn", "rope_theta": 20.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 0.5, "beta_slow": 0.1}


def deepseek(q_lora_rank: int | None, rope: dict):
    config, cls = deepseek_v3()
    config.q_lora_rank = q_lora_rank
    config.rope_parameters = rope
    return config, cls


def qwen2(rope: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=rope), Qwen2ForCausalLM


# name -> (HF config + class, ModelConfig changes each of which must move our logits away from HF's)
MODELS = {
    # DeepSeek-V3 / Kimi-K2 style: both mscales set, so the cos/sin factor is their ratio and the
    # softmax scale is multiplied by mscale(factor, mscale_all_dim)^2
    "deepseek_v3_yarn": (lambda: deepseek(32, {**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}),
                         [{"yarn_scaling_factor": None}, {"yarn_mscale_all_dim": None}, {"yarn_beta_fast": 32.0}]),
    # DeepSeek-V2-Lite style: no q latent (q_proj), YaRN with mscale = mscale_all_dim
    "deepseek_no_q_lora_yarn": (lambda: deepseek(None, {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
                                [{"yarn_scaling_factor": None}, {"yarn_original_max_position": 64}]),
    "deepseek_no_q_lora": (lambda: deepseek(None, {"rope_type": "default", "rope_theta": 10000.0}), []),
    # Qwen2.5 / Qwen3 long context: no mscales, cos/sin factor mscale(factor) = 1 + 0.1 ln 4
    "qwen2_yarn": (lambda: qwen2(YARN), [{"yarn_scaling_factor": None}, {"yarn_beta_slow": 1.0},
                                         {"yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.5}]),
}


def save_hf(name: str, root: Path):
    """(transformers model in eval mode, its checkpoint directory root/name, several shards)."""
    config, cls = MODELS[name][0]()
    torch.manual_seed(0)
    model = cls(config).float().eval()
    _randomize(model, seed=1)
    model.save_pretrained(root / name, max_shard_size="60KB")
    return model, root / name


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def our_logits(cfg, hf_dir: Path):
    """(model, logits) of our megatron model of `cfg` with the weights of `hf_dir`."""
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_for, read_hf_config
    from nemo_rlsr.models.hf.load import load_hf_weights

    model = build_gpt(cfg, cfg.vocab_size).eval()
    load_hf_weights(model, adapter_for(read_hf_config(hf_dir)["model_type"]), cfg, hf_dir)
    with torch.no_grad():
        logits = model(IDS, torch.arange(IDS.shape[1]).expand_as(IDS),
                       attention_mask(torch.ones_like(IDS, dtype=torch.bool)))
    return model, logits[..., :VOCAB]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_equal_transformers_and_exact_round_trip(name, single_rank, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_rlsr.models.hf import adapter_and_config, read_hf_config
    from nemo_rlsr.models.hf.save import save_hf_checkpoint

    hf_model, hf_dir = save_hf(name, tmp_path)
    adapter, cfg = adapter_and_config(hf_dir)
    model, ours = our_logits(cfg, hf_dir)
    reference = hf_logits(hf_model)
    assert reference.std() > 0.1
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)

    for change in MODELS[name][1]:  # without (or with another) setting: other logits
        _, altered = our_logits(dataclasses.replace(cfg, **change), hf_dir)
        error = (altered - reference).abs().max().item()
        assert error > 100 * ATOL, f"{change}: logits still within {error:.1e} of transformers'"

    export = tmp_path / "export"
    save_hf_checkpoint(model, adapter, cfg, export)
    assert_same_tensors(export, hf_dir)
    assert adapter.model_config(read_hf_config(export)) == cfg  # config.json round trip
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(exported), reference, atol=0, rtol=0)


def test_yarn_config_reading():
    """transformers' defaults (original context, factor, betas), the transformers-4 `rope_scaling`
    form, and the YaRN settings megatron cannot compute, refused with the reason."""
    from nemo_rlsr.models.hf import adapter_for

    base = json.loads(qwen2(YARN)[0].to_json_string())
    qwen, deepseek_adapter = adapter_for("qwen2"), adapter_for("deepseek_v3")
    cfg = qwen.model_config(base)
    assert (cfg.yarn_scaling_factor, cfg.yarn_original_max_position, cfg.yarn_beta_fast, cfg.yarn_beta_slow,
            cfg.yarn_mscale, cfg.yarn_mscale_all_dim) == (4.0, 8, 0.5, 0.1, None, None)
    legacy = {**base, "rope_parameters": None, "rope_theta": 20.0,
              "rope_scaling": {k: v for k, v in YARN.items() if k != "rope_theta"} | {"type": "yarn"}}
    assert qwen.model_config(legacy) == cfg
    bare = qwen.model_config({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 20.0}})
    assert (bare.yarn_scaling_factor, bare.yarn_original_max_position, bare.yarn_beta_fast,
            bare.yarn_beta_slow) == (1.0, 64, 32.0, 1.0)

    for extra, match in (({"attention_factor": 1.2}, "attention_factor=1.2 is not supported"),
                         ({"truncate": False}, "truncate=False is not supported")):
        with pytest.raises(ValueError, match=match):
            qwen.model_config({**base, "rope_parameters": {**YARN, **extra}})
    deepseek_config = json.loads(deepseek(32, {**YARN, "mscale_all_dim": 1.0})[0].to_json_string())
    with pytest.raises(ValueError, match="mscale_all_dim=1.0 without mscale is not supported"):
        deepseek_adapter.model_config(deepseek_config)


def test_dense_yarn_refuses_partial_rotary(single_rank):
    from nemo_rlsr.config import ModelConfig
    from nemo_rlsr.models.gpt import build_gpt

    with pytest.raises(ValueError, match="rotary_percent=0.5 is not supported"):
        build_gpt(ModelConfig(yarn_scaling_factor=4.0, rotary_percent=0.5), 128)


@pytest.mark.parametrize("name", ["qwen2_yarn", "deepseek_v3_yarn"])
def test_kv_cache_sampler_matches_transformers(name, single_rank, tmp_path):
    """Generation with YaRN: the torch sampler's KV-cache decode (megatron's static inference
    context, one position per step) gives transformers' logprobs of the sequence it produced."""
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
    from nemo_rlsr.models.hf import adapter_and_config

    hf_model, hf_dir = save_hf(name, tmp_path)
    _, cfg = adapter_and_config(hf_dir)
    model, _ = our_logits(cfg, hf_dir)
    prompt = IDS[0, :5].tolist()
    engine = TorchRolloutEngine(model, pad_id=0, eos_id=-1, vocab_size=VOCAB)
    batch = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_on_eos=False), seed=3)
    sequence = batch.input_ids[:1, : len(prompt) + 8]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(input_ids=sequence).logits.float(), dim=-1)
    expected = reference[0, :-1].gather(1, sequence[0, 1:, None]).squeeze(1)[len(prompt) - 1:]
    ours = batch.engine_logprobs[0, len(prompt) - 1 : len(prompt) + 7]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_deepseek_v3_release_rope_scaling_reaches_megatron():
    """DeepSeek-V3's published transformers-4 `rope_scaling` (Kimi-K2's has the same keys) -> the
    MLATransformerConfig fields megatron's MLA reads, on a tiny shape."""
    import math

    from nemo_rlsr.models.gpt import transformer_config
    from nemo_rlsr.models.hf import adapter_for

    hf_config = json.loads(deepseek(32, {"rope_type": "default", "rope_theta": 10000.0})[0].to_json_string())
    hf_config = {**hf_config, "rope_parameters": None, "rope_theta": 10000, "max_position_embeddings": 163840,
                 "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                  "original_max_position_embeddings": 4096, "type": "yarn"}}
    config = transformer_config(adapter_for("deepseek_v3").model_config(hf_config))
    assert (config.rope_type, config.rotary_scaling_factor, config.original_max_position_embeddings,
            config.beta_fast, config.beta_slow, config.mscale, config.mscale_all_dim) == ("yarn", 40.0, 4096, 32.0,
                                                                                            1.0, 1.0, 1.0)
    assert not hasattr(config, "yarn_rotary_scaling_factor")  # MLA's own fields, not GPTModel's YaRN
    assert math.isclose(config.rotary_base, 10000)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_two_rank_logits_and_exact_round_trip(layout, tmp_path):
    """YaRN split over 2 gloo ranks (yarn_worker.py): TP=2 (heads, and with them the rotary
    embedding's inputs, on two ranks) and PP=2 (each stage builds its own rotary embedding)."""
    from distributed_helpers import run_workers

    names = ["deepseek_v3_yarn", "qwen2_yarn"]
    models = {name: save_hf(name, tmp_path / "hf")[0] for name in names}
    ranks = run_workers(layout, tmp_path, timeout_s=240, worker=Path(__file__).parent / "yarn_worker.py")
    for name in names:
        for rank in ranks if layout == "tp2" else ranks[1:]:  # PP: the last stage has the logits
            torch.testing.assert_close(rank[name][..., :VOCAB], hf_logits(models[name]), atol=ATOL, rtol=0)
        assert_same_tensors(tmp_path / f"export_{layout}" / name, tmp_path / "hf" / name)
