"""The trainer's start-up check of a run's parallel layout, activation recompute and FP8 settings.

The divisibility rules are the planner's (`planner.layout.layout_problems`, which starts from the
split's own, `distributed.dims.ParallelDims.problems`: one copy of each rule),
applied to the world size this job actually got; on top of them come the rules that depend on
what is installed where the trainer runs (Transformer Engine, a GPU) and on megatron-core's
recompute options. Every refusal names the keys and the reason, all at once, before any model is
built.
"""

from __future__ import annotations

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.models.precision import fp8_problems, params_dtype_problems, transformer_impl_problems, uses_te_spec
from nemo_rlsr.models.recompute import recompute_problems
from nemo_rlsr.planner.layout import Layout, layout_problems
from nemo_rlsr.planner.shapes import ModelShape


def engine_problems(cfg: RLSRConfig, te_version: str | None, capability: tuple[int, int] | None) -> list[str]:
    """Context parallelism runs on the local spec only (models/context_parallel.py: all-gather-KV,
    standard and grouped-query attention, not multi-latent attention's core attention). On the TE
    spec the `mask` layout's `arbitrary` attention (models/spec.py) is not what TE's context-parallel
    attention takes (causal / padding-causal only), and THD over CP (every sequence padded to 2 x CP,
    models/packed_seq.py) is not built."""
    p, m = cfg.parallel, cfg.model
    if p.context_parallel <= 1:
        return []
    if uses_te_spec(m.transformer_impl, te_version, capability):
        return [f"parallel.context_parallel={p.context_parallel} runs on megatron's local layer spec only, and this job "
                f"builds Transformer Engine's (model.transformer_impl={m.transformer_impl}, TE {te_version}): TE's "
                f"context-parallel attention takes causal / padding-causal masks, not the explicit mask of "
                f"left-padded and packed rows, and THD sequences over CP are not built; set "
                f"model.transformer_impl=local"]
    if m.multi_latent_attention:
        return [f"parallel.context_parallel={p.context_parallel} with model.multi_latent_attention=true is not built "
                f"(the local spec's all-gather-KV context parallelism covers standard and grouped-query attention)"]
    return []


def moe_problems(cfg: RLSRConfig) -> list[str]:
    """megatron refuses to train MoE layers at TP>1 without sequence parallelism: said here,
    before any model is built."""
    p = cfg.parallel
    if cfg.model.num_moe_experts and p.tensor_parallel > 1 and not p.sequence_parallel:
        return [f"model.num_moe_experts={cfg.model.num_moe_experts} with parallel.tensor_parallel="
                f"{p.tensor_parallel} needs parallel.sequence_parallel=true (megatron trains MoE layers at "
                f"TP>1 only with sequence parallelism), or parallel.tensor_parallel=1"]
    return []


def interleaved_problems(cfg: RLSRConfig, dp: int, mode: str) -> list[str]:
    """The interleaved schedule runs micro-batches in groups of PP: each optimizer step's
    micro-batch count per DP rank must be a multiple of pipeline_parallel (forward-only passes pad
    themselves, MegatronPolicy.logprobs)."""
    p = cfg.parallel
    if not p.virtual_pipeline_parallel or p.pipeline_parallel <= 1:
        return []
    if mode == "sft":
        s = cfg.sft
        micro, what = s.global_batch_size // max(dp * s.micro_batch_size, 1), (
            f"sft.global_batch_size={s.global_batch_size} / (DP={dp} x sft.micro_batch_size={s.micro_batch_size})")
    else:
        g = cfg.grpo
        rows = g.prompts_per_step // dp * g.num_generations // g.mini_batches_per_step
        micro, what = rows // g.micro_batch_size, (
            f"{rows} rows per mini-batch and DP rank / grpo.micro_batch_size={g.micro_batch_size}")
    if micro % p.pipeline_parallel:
        return [f"parallel.virtual_pipeline_parallel={p.virtual_pipeline_parallel} (interleaved schedule) needs "
                f"the micro-batches per step to be a multiple of parallel.pipeline_parallel={p.pipeline_parallel}; "
                f"{what} = {micro}"]
    return []


def run_problems(cfg: RLSRConfig, world_size: int, te_version: str | None,
                 capability: tuple[int, int] | None, mode: str = "rlsr", cuda_version: str | None = None) -> list[str]:
    """Every layout / recompute / FP8 rule the config breaks on a job of `world_size` ranks (on a
    machine with that TE version, GPU compute capability and CUDA version; None where unknown)."""
    lay = Layout.of(cfg, nodes=1, gpus_per_node=world_size)
    problems = layout_problems(cfg, ModelShape.build(cfg.model, vocab_size=1), lay, mode)
    if not problems:  # batch splits are only meaningful on a layout that divides
        problems = interleaved_problems(cfg, lay.dp, mode)
    return (problems + moe_problems(cfg) + recompute_problems(cfg) + engine_problems(cfg, te_version, capability)
            + transformer_impl_problems(cfg, te_version, capability) + params_dtype_problems(cfg)
            + fp8_problems(cfg, te_version, capability, cuda_version))
