"""Estimated wall time of one RLSR step (or one SFT optimizer step), phase by phase.

A roofline estimate from the numbers in hardware.py: compute phases are FLOPs / (peak x assumed
MFU), decoding is bytes read per step / (HBM bandwidth x assumed efficiency), communication is
bytes / (link bandwidth x assumed bus efficiency) and is NOT assumed hidden behind compute. Only
as good as those assumptions: calibrate them against the `time/*` metrics of a real run.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.planner.hardware import EFFICIENCY, Device
from nemo_rlsr.planner.layout import Layout
from nemo_rlsr.planner.memory import (Memory, encoder_window, engine_weight_bytes, kv_bytes_per_token,
                                      param_bytes, stage_params)
from nemo_rlsr.planner.refit import refit_received_bytes
from nemo_rlsr.planner.shapes import ENCODERS, ModelShape

MEAN_PROMPT_TOKENS = 256  # ASSUMED: instruction prompts of TULU / Infinity-Instruct are short
RESPONSE_FILL = 0.5  # ASSUMED: responses average half of rollout.max_new_tokens
CPU_CORE_FLOPS = 50e9  # ASSUMED: one core's fp32 FLOP/s in an encoder forward (AVX-512 FMA, ~60% busy)


@dataclass
class StepTime:
    phases: dict[str, float]  # seconds
    notes: list[str]
    overlapped: bool = False  # asynchronous GRPO: generation runs beside the trainer's phases

    @property
    def total(self) -> float:
        return overlapped_step_seconds(self.phases) if self.overlapped else sum(self.phases.values())


def overlapped_step_seconds(phases: dict[str, float]) -> float:
    """One step of asynchronous GRPO (rollout.placement=separate, grpo.max_staleness >= 1): the
    worker generates the next step's rollouts while the trainer scores, computes logprobs and
    trains on this step's, and both wait for the refit between them (trainer/async_rollouts.py),
    so a step takes the longer side plus the refit instead of the sum. At staleness 0 the worker
    waits for each refit and the trainer for each generation: the sum (`StepTime.total`)."""
    generation, refit = phases.get("generation", 0.0), phases.get("refit", 0.0)
    trainer = sum(v for k, v in phases.items() if k not in ("generation", "refit"))
    return max(generation, trainer) + refit


@dataclass(frozen=True)
class Lengths:
    prompt: float
    response: float

    @property
    def sequence(self) -> float:
        return self.prompt + self.response

    @classmethod
    def of(cls, cfg: RLSRConfig) -> "Lengths":
        budget = cfg.model.max_sequence_length - cfg.rollout.max_new_tokens
        return cls(min(MEAN_PROMPT_TOKENS, budget / 2), RESPONSE_FILL * cfg.rollout.max_new_tokens)


def _link(dev: Device, lay: Layout, group: int) -> float:
    bandwidth = dev.inter_node_bytes_per_s if lay.spans_nodes(group) else dev.intra_node_bytes_per_s
    return bandwidth * EFFICIENCY.link


def _micro_batches(rows: float, micro_batch_size: int, budget: int | None, row_tokens: float) -> float:
    """Micro-batches per rank: fixed ones of `micro_batch_size` rows, or under a token budget about
    the rows' tokens over the budget (sorted rows of similar lengths fill it; models/microbatches.py)."""
    return max(rows * row_tokens / budget, 1.0) if budget else rows / micro_batch_size


def _bubble(lay: Layout, micro_batches: float) -> float:
    return 1 + (lay.pp - 1) / (lay.virtual_stages * max(micro_batches, 1))


def _model_comm(cfg: RLSRConfig, shape: ModelShape, lay: Layout, dev: Device, tokens_per_dp: float) -> float:
    """One forward pass's tensor-parallel collectives and MoE all-to-alls on one GPU (a backward
    pass moves the same bytes again, a recomputed forward once more)."""
    h, layers = cfg.model.hidden_size, max(lay.layers_per_stage(cfg.model.num_layers))
    seconds = 0.0
    if lay.tp > 1:  # 2 all-gathers + 2 reduce-scatters (or 2 all-reduces) per layer
        seconds += layers * 4 * tokens_per_dp / lay.cp * h * 2 * (lay.tp - 1) / lay.tp / _link(dev, lay, lay.tp)
    if cfg.model.num_moe_experts and lay.ep > 1:  # dispatch + combine, top-k copies of each token
        moe_layers = layers * shape.moe_layers / cfg.model.num_layers
        local = tokens_per_dp / lay.cp / (lay.tp if lay.sequence_parallel else 1)
        sent = local * cfg.model.moe_router_topk * h * 2 * 2 * (lay.ep - 1) / lay.ep
        seconds += moe_layers * sent / _link(dev, lay, lay.tp * lay.ep)
    return seconds


def _generation(cfg, shape, lay, dev, memory: Memory, n: Lengths) -> float:
    """Prefill, then decode steps until every sequence is done. At most `concurrent` sequences fit
    the KV cache; the longest response bounds the step count from below, and as sequences finish
    the batch shrinks, so each step reads the weights once plus the KV of the *average* batch."""
    eff, c = EFFICIENCY, cfg.model
    seqs = cfg.grpo.prompts_per_step * cfg.grpo.num_generations / lay.engines
    kv_token = kv_bytes_per_token(cfg, shape, lay)
    concurrent = max(1.0, min(seqs, memory.items["rollout KV cache"] / (n.sequence * kv_token)))
    steps = max(seqs * n.response / concurrent, cfg.rollout.max_new_tokens)
    batch = seqs * n.response / steps  # sequences decoding in an average step
    wbytes = param_bytes(cfg) if cfg.rollout.engine == "torch" else 2
    weights = shape.total_params()
    if c.num_moe_experts:  # experts a decode step touches: all of them once the batch is large
        experts = shape.moe_layers * shape.expert_params()
        weights -= experts * (1 - min(1.0, batch * c.moe_router_topk / c.num_moe_experts))
    context = n.prompt + n.response / 2
    if c.multi_latent_attention:  # attention data parallel: non-expert weights read whole on every GPU
        experts = shape.moe_layers * shape.expert_params() if c.num_moe_experts else 0
        touched = weights - (shape.total_params() - experts)
        weight_read = touched / lay.engine_tp + shape.total_params() - experts
    else:
        weight_read = weights / lay.engine_tp
    read = weight_read * wbytes + batch * context * kv_token
    flops = batch * (2 * shape.active_params() + shape.attention_flops_per_token(context)) / lay.engine_tp
    step = max(read / (dev.hbm_bytes_per_s * eff.decode_hbm), flops / (dev.peak_flops * eff.decode_flops))
    if lay.engine_tp > 1:
        step += 2 * c.num_layers * eff.collective_latency_s
    prefill = seqs * n.prompt * (2 * shape.active_params() + shape.attention_flops_per_token(n.prompt))
    return steps * step + prefill / lay.engine_tp / (dev.peak_flops * EFFICIENCY.prefill)


def _refit(cfg, shape, lay, dev) -> float:
    if cfg.rollout.placement == "separate":  # the whole state dict to the worker's own copy
        return param_bytes(cfg) * shape.total_params() / _link(dev, lay, lay.world)
    if cfg.rollout.engine != "trtllm":
        return 0.0  # the torch and megatron engines run on the policy's own weights
    """The busiest GPU's bytes of a shard-only refit (planner/refit.py) over the links of the ranks
    that send them, plus writing its engine shard into the engine's weights."""
    shard = engine_weight_bytes(cfg, shape, lay)
    received = refit_received_bytes(shard, lay.tp, lay.pp, lay.engine_tp)
    group = max(lay.tp * lay.pp * lay.cp * lay.ep, lay.engine_tp)
    return received / _link(dev, lay, group) + shard / dev.hbm_bytes_per_s


def _dp_sync(cfg, shape, lay, dev) -> float:
    """Gradient reduce-scatter + parameter all-gather (distributed optimizer) of one update."""
    st = max(stage_params(shape, lay), key=lambda s: s.dense + s.expert)
    per_param = 4 + param_bytes(cfg) if cfg.optimizer.use_distributed_optimizer else 8
    dense = st.dense * per_param * (lay.dp - 1) / lay.dp
    expert = st.expert * per_param * (lay.expert_dp - 1) / lay.expert_dp
    return (dense + expert) / _link(dev, lay, lay.world)


def _reward(cfg, lay, dev, rollouts: int, n: Lengths) -> float:
    """Encoder FLOPs over the responses (and each prompt's reference) on the devices that run it."""
    r, eff = cfg.reward, EFFICIENCY
    if r.backend == "openai":
        return 0.0  # the server's hardware is not part of the plan
    enc = ENCODERS[r.encoder]
    per_text = n.response if r.long_response == "chunk" else min(n.response, encoder_window(cfg))
    flops = 2 * enc.params * (rollouts + cfg.grpo.prompts_per_step) * per_text
    if r.backend == "ray" and r.ray_gpus_per_actor == 0:
        return flops / (r.ray_num_actors * r.ray_cpus_per_actor * CPU_CORE_FLOPS)
    gpus = lay.world if r.backend == "local" else r.ray_num_actors * r.ray_gpus_per_actor
    return flops / (gpus * dev.peak_flops * (eff.reward_large if enc.params >= 1e9 else eff.reward_small))


def recomputed_layer_fraction(cfg: RLSRConfig, lay: Layout) -> float:
    """Share of a stage's layers whose forward runs again in the backward pass: all of them under
    full `uniform` recompute, the first `recompute_num_layers` of each stage under `block`."""
    m = cfg.model
    if m.recompute_granularity != "full":
        return 0.0
    if m.recompute_method != "block":
        return 1.0
    per_stage = m.num_layers / (lay.pp * lay.virtual_stages)
    return min((m.recompute_num_layers or 1) / per_stage, 1.0)


def plan_time(cfg: RLSRConfig, shape: ModelShape, lay: Layout, dev: Device, memory: Memory, mode: str) -> StepTime:
    eff = EFFICIENCY
    mfu = eff.train_moe if cfg.model.num_moe_experts else eff.train_dense
    recompute = 1 + recomputed_layer_fraction(cfg, lay) / 3  # a recomputed layer runs its forward twice
    notes = ["communication is not assumed to overlap with compute"]
    if mode == "sft":
        seq = cfg.model.max_sequence_length
        tokens = cfg.sft.global_batch_size * seq
        flops = tokens * (6 * shape.active_params() + 3 * shape.attention_flops_per_token(seq)) * recompute
        micro = _micro_batches(cfg.sft.global_batch_size / lay.dp, cfg.sft.micro_batch_size,
                               cfg.sft.max_tokens_per_microbatch, seq)
        train = flops / lay.world / (dev.peak_flops * mfu) * _bubble(lay, micro)
        train += (2 + (recompute > 1)) * _model_comm(cfg, shape, lay, dev, tokens / lay.dp) + _dp_sync(cfg, shape, lay, dev)
        return StepTime({"training": train}, notes)

    n = Lengths.of(cfg)
    g = cfg.grpo
    rollouts = g.prompts_per_step * g.num_generations
    tokens = rollouts * n.sequence
    reward = _reward(cfg, lay, dev, rollouts, n)
    if cfg.reward.backend == "openai":
        notes.append("reward: a remote embeddings endpoint, its time not modelled (0 s)")

    rows = rollouts / lay.dp
    fwd = tokens * (2 * shape.active_params() + shape.attention_flops_per_token(n.sequence))
    comm = _model_comm(cfg, shape, lay, dev, tokens / lay.dp)
    budget = g.max_tokens_per_microbatch
    logprobs = 2 * (fwd / lay.world / (dev.peak_flops * eff.forward)
                    * _bubble(lay, _micro_batches(rows, g.micro_batch_size, budget, n.sequence)) + comm)
    micro = _micro_batches(rows / g.mini_batches_per_step, g.micro_batch_size, budget, n.sequence)
    train = 3 * fwd * recompute / lay.world / (dev.peak_flops * mfu) * _bubble(lay, micro)
    train += (2 + (recompute > 1)) * comm + g.mini_batches_per_step * _dp_sync(cfg, shape, lay, dev)
    phases = {
        "generation": _generation(cfg, shape, lay, dev, memory, n),
        "reward": reward,
        "logprobs": logprobs,
        "training": train,
        "refit": _refit(cfg, shape, lay, dev),
    }
    notes.append(f"mean prompt {n.prompt:.0f} + response {n.response:.0f} tokens (ASSUMED)")
    overlapped = cfg.rollout.placement == "separate" and g.max_staleness >= 1
    if overlapped:
        notes.append(f"asynchronous (grpo.max_staleness={g.max_staleness}): total = max(generation, the trainer's "
                     f"phases) + refit" + ("" if lay.rollout_gpus else
                                           "; the worker's devices are not in the layout (ASSUMED as fast as the "
                                           "engines')"))
    return StepTime(phases, notes, overlapped)
