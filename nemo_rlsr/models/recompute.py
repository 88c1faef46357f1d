"""megatron-core's activation-recompute options, checked as config rules (no torch, no megatron:
the planner runs them on login nodes, the trainer at start-up, before megatron would raise)."""

from __future__ import annotations

from nemo_rlsr.config import RLSRConfig

RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def recompute_problems(cfg: RLSRConfig) -> list[str]:
    """megatron-core's recompute rules, stated with our keys: `full` recomputes groups of whole
    layers (`uniform`: every group of `recompute_num_layers`; `block`: the first
    `recompute_num_layers` of each stage); `selective` recomputes core attention in every layer and
    takes neither key."""
    m, p = cfg.model, cfg.parallel
    granularity, method, num = m.recompute_granularity, m.recompute_method, m.recompute_num_layers
    if granularity is None:
        return [f"model.{key} needs model.recompute_granularity=full"
                for key, value in (("recompute_method", method), ("recompute_num_layers", num)) if value is not None]
    if granularity not in RECOMPUTE_GRANULARITIES:
        return [f"model.recompute_granularity={granularity!r}: choose one of {', '.join(RECOMPUTE_GRANULARITIES)}"]
    if granularity == "selective":
        return [f"model.{key} must be null with model.recompute_granularity=selective (it recomputes "
                f"core attention in every layer)"
                for key, value in (("recompute_method", method), ("recompute_num_layers", num)) if value is not None]
    out = []
    if method not in RECOMPUTE_METHODS:
        out.append(f"model.recompute_granularity=full needs model.recompute_method in "
                   f"{', '.join(RECOMPUTE_METHODS)} (got {method!r})")
    per_stage = m.num_layers // (p.pipeline_parallel * (p.virtual_pipeline_parallel or 1))
    if num is None or not 1 <= num <= per_stage:
        out.append(f"model.recompute_granularity=full needs model.recompute_num_layers between 1 and the "
                   f"layers per pipeline stage ({per_stage}); got {num}")
    return out
