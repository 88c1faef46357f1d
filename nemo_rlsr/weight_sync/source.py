"""The trainer's module as a stream of (HF name, full tensor): what every refit sends.

Full (TP-gathered, vocabulary-trimmed) tensors under HF names are the engine-neutral format: the
engine applies its own TP layout, so a trainer with another TP size needs no resharding logic here,
and under pipeline parallelism every rank receives every stage's tensors (PP->TP: the engine's
loader shards them). One parameter is gathered at a time, so no rank holds the whole model.

The gathering itself is `nemo_rlsr.models.hf.save` (the same code that writes HF checkpoints):
`iter_hf_tensors` (this stage's tensors, TP shards all-gathered) and, under PP,
`iter_all_hf_tensors` (every stage's tensors on every rank).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import HFAdapter


def hf_named_tensors(modules, adapter: HFAdapter, cfg: ModelConfig, vocab_size: int
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor) for every HF tensor of the model, one at a time, on every rank of the
    model-parallel group (a collective: all of them must iterate it in lockstep). Tensors may be
    views of live parameters (zero-copy for IPC): consume or clone them before the next step.
    `modules`: this rank's model, or its list of chunks under interleaved PP (MegatronPolicy.chunks).
    `adapter`: the policy's architecture (MegatronPolicy.hf_adapter), the one the engine's
    config.json names. `vocab_size`: the embedding rows sent (the tokenizer's: ids past it are never
    sampled, and megatron's padding rows are trimmed)."""
    from megatron.core import parallel_state

    from nemo_rlsr.models.hf import save

    cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        yield from save.iter_hf_tensors(modules, adapter, cfg)
    else:
        yield from save.iter_all_hf_tensors(modules, adapter, cfg)
