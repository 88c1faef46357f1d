"""Starting a run from a local HF checkpoint (`model.hf_path`): its shape and its weights.

The model's shape comes from config.json (through the architecture's adapter); the fields a
config.json does not describe (precision, recompute, FP8, ...) stay the run's. A run field that
config.json also sets must either be left at its default or agree, so a recipe that says
`num_layers: 32` for a 28-layer checkpoint fails instead of building the wrong model. The
training context (`max_sequence_length`) is the run's choice, not config.json's
max_position_embeddings (RoPE has no learned positions), so a run's value wins there.
"""

from __future__ import annotations

import dataclasses

from nemo_rlsr.config import ConfigError, ModelConfig
from nemo_rlsr.models.hf import adapter_and_config

RUN_CHOICES = ("max_sequence_length",)


def merge_hf_shape(run: ModelConfig, shape: ModelConfig) -> ModelConfig:
    """`run` with every field that `shape` (from config.json) sets; conflicting values are an error."""
    default = ModelConfig()
    merged, conflicts = {}, []
    for field in dataclasses.fields(ModelConfig):
        mine, theirs, base = getattr(run, field.name), getattr(shape, field.name), getattr(default, field.name)
        if theirs == base or mine == theirs or (field.name in RUN_CHOICES and mine != base):
            continue
        if mine != base:
            conflicts.append(f"model.{field.name}={mine!r} but config.json gives {theirs!r}")
        merged[field.name] = theirs
    if conflicts:
        raise ConfigError(f"model.hf_path={run.hf_path}: " + "; ".join(conflicts)
                          + " (leave these keys unset: the checkpoint's config.json sets them)")
    return dataclasses.replace(run, **merged)


def with_hf_model(cfg):
    """The run config (RLSRConfig) with `model` shaped by `model.hf_path`'s config.json; unchanged
    without hf_path. (That an HF model comes with its own tokenizer, `data.tokenizer_path`, is a
    start-up rule: trainer/startup.py.)"""
    if not cfg.model.hf_path:
        return cfg
    _, shape = adapter_and_config(cfg.model.hf_path)
    return dataclasses.replace(cfg, model=merge_hf_shape(cfg.model, shape))


def load_hf_policy(policy, model_cfg: ModelConfig, tokenizer_vocab: int):
    """Load `model_cfg.hf_path`'s weights into `policy` (MegatronPolicy), each rank its own shard
    (returns load.LoadStats: parameters set, bytes this rank read).

    The tokenizer may have fewer ids than the embedding has rows (Qwen: 151665 of 151936): the
    policy masks ids past the tokenizer's; it may not have more."""
    from nemo_rlsr.models.hf.load import load_hf_weights

    if tokenizer_vocab > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} ids, {model_cfg.hf_path} has "
                         f"{model_cfg.vocab_size} embedding rows")
    adapter, _ = adapter_and_config(model_cfg.hf_path)
    return load_hf_weights(policy.chunks, adapter, model_cfg, model_cfg.hf_path)
