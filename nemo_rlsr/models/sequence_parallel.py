"""Running a sequence-parallel model outside megatron's schedule, one token at a time.

Under sequence parallelism (SP) the trainer's module expects each TP rank to hold 1/TP of the
sequence between its tensor-parallel regions. The torch rollout sampler decodes one token per step,
which cannot be split over TP, so it runs the same module with SP switched off: every TP rank then
holds the whole (short) sequence, the linear layers all-reduce instead of reduce-scatter /
all-gather, and the weights (and their sharding) are the same. The math is the same too, up to
float summation order.

What megatron reads at forward time, and what `sequence_parallel_off` therefore switches:
* `config.sequence_parallel` of every TransformerConfig the model's modules hold (one shared
  object, plus copies some modules make, e.g. MLA's core attention): the embedding's scatter, the
  attention / MLA / shared-expert / rotary paths, the RNG fork of the block;
* the `sequence_parallel` attribute the tensor-parallel linears (and the output layer, MTP) copy
  from the config when built;
* `reduce_scatter_embeddings` of the embedding (`VocabParallelEmbedding` reduce-scatters its output
  when set, whatever the config says).
MoE layers need nothing more: their token dispatcher gathers over the expert groups either way
(checked at expert_tensor_parallel=1), and megatron refuses MoE at TP>1 without SP only in training. Parameters' own `sequence_parallel`
tags only matter to gradient reduction and are left alone.

megatron has `set_model_to_sequence_parallel`, but switching back it sets every attribute to one
value, not the value each module had (and caches modules per `id(model)` in a module global); this
records and restores each value.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_MODULE_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextmanager
def sequence_parallel_off(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` without sequence parallelism inside the block; every flag is restored on exit
    (also on an exception). A no-op for a model built without SP."""
    switched: list[tuple[object, str]] = []
    configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
    for owner in [*configs.values(), *module.modules()]:
        for flag in _MODULE_FLAGS:
            if getattr(owner, flag, False) is True:
                setattr(owner, flag, False)
                switched.append((owner, flag))
    try:
        yield
    finally:
        for owner, flag in switched:
            setattr(owner, flag, True)
