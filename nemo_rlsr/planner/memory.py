"""Per-GPU memory of one RLSR (or SFT) step, phase by phase, on the most loaded pipeline stage.

Training state per parameter (megatron DDP with fp32 gradient buffers, Adam): float32 params keep
4 (weights) + 4 (grads) + 8 (Adam moments); bf16 params keep 2 + 4 + 12 (fp32 master copy and
moments), megatron's "6 + 12/d" when the distributed optimizer shards the 12 over d data-parallel
ranks (expert weights over their own, smaller, expert-data-parallel group).

Phases, colocated on the same GPUs (the NeMo-RL / verl arrangement; ASSUMED for the GPU path):
- generation: the engine's weights (a bf16 copy for TensorRT-LLM; megatron and torch engines
  share the policy's) and its KV cache, next to the policy's and reference's weights; the policy's
  grads and optimizer state are offloaded to host memory for TensorRT-LLM / megatron engines
  (our torch sampler keeps them).
- logprobs / training: policy state + the frozen reference's weights + activations; the engine has
  released its weights and KV cache.
The reward encoder is on every GPU (`reward.backend: local`) or on the GPUs of the Ray pool's
actors (`ray`, when `ray_gpus_per_actor` > 0; counted once, as if colocated with a training rank);
with `reward.offload_between_steps` it is on the GPU only around scoring, i.e. not in the
logprobs and training phases. With `reward.backend: openai` it is on a server outside the job: 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.config.rules import attention_layout
from nemo_rlsr.planner.activations import LOGIT_CHUNK_BYTES, SCORE_WORKING_COPIES, final_elements, layer_elements
from nemo_rlsr.planner.hardware import FRAGMENTATION_HEADROOM, Device
from nemo_rlsr.planner.layout import Layout
from nemo_rlsr.planner.shapes import ENCODERS, ModelShape

MIN_CONCURRENT_SEQUENCES = 8  # ASSUMED: fewer full-length sequences per engine is not worth running
ENCODER_WORK_ELEMENTS = 16  # ASSUMED: an encoder forward's live intermediates per token, x hidden


def param_bytes(cfg: RLSRConfig) -> int:
    return 4 if cfg.model.params_dtype == "float32" else 2


@dataclass
class StageParams:
    dense: float  # this GPU's share of the weights replicated across expert-parallel ranks
    expert: float  # this GPU's share of routed-expert weights
    layers: list[int] = field(default_factory=list)
    first: bool = False
    last: bool = False


def stage_params(shape: ModelShape, lay: Layout) -> list[StageParams]:
    """Each pipeline stage's parameters per GPU (contiguous layer blocks, as megatron assigns)."""
    stages, start = [], 0
    for s, count in enumerate(lay.layers_per_stage(shape.cfg.num_layers)):
        layers, start = list(range(start, start + count)), start + count
        dense = sum(shape.layer_params(i)[0] for i in layers) / lay.tp
        expert = sum(shape.layer_params(i)[1] for i in layers) / (lay.ep * lay.etp)
        first, last = s == 0, s == lay.pp - 1
        if first:
            dense += shape.embedding_params / lay.tp
        if last:
            dense += shape.cfg.hidden_size
            dense += (shape.output_params or (shape.embedding_params if lay.pp > 1 else 0)) / lay.tp
        stages.append(StageParams(dense, expert, layers, first, last))
    return stages


@dataclass
class Memory:
    """Bytes per GPU. `items` are the report's lines; `phases` their sums per phase."""

    items: dict[str, float]
    phases: dict[str, float]
    usable: float
    stage: int
    notes: list[str]
    phase_items: dict[str, list[str]] = field(default_factory=dict)  # which items each phase holds

    def largest(self, phase: str, count: int = 3) -> list[tuple[str, float]]:
        names = self.phase_items.get(phase, list(self.items))
        return sorted(((n, self.items[n]) for n in names), key=lambda kv: -kv[1])[:count]

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def usable_bytes(dev: Device) -> float:
    return (dev.memory_bytes - dev.runtime_reserve_bytes) * (1 - FRAGMENTATION_HEADROOM)


def training_state(cfg: RLSRConfig, st: StageParams, lay: Layout) -> dict[str, float]:
    pb = param_bytes(cfg)
    optim = 12 if pb == 2 else 8
    dp, edp = (lay.dp, lay.expert_dp) if cfg.optimizer.use_distributed_optimizer else (1, 1)
    return {
        "weights": (st.dense + st.expert) * pb,
        "grads": (st.dense + st.expert) * 4,
        "optimizer": st.dense * optim / dp + st.expert * optim / edp,
    }


def activation_bytes(cfg: RLSRConfig, shape: ModelShape, lay: Layout, st: StageParams, stage: int,
                     profile: str, micro_tokens: int, micro_rows: int, in_flight_batches: int) -> float:
    """Saved activations of the micro-batches in flight on this stage, plus the loss's buffers.
    `micro_tokens`: the largest micro-batch in token positions (rows x width); `micro_rows`: its
    rows (more than one makes megatron copy the logits, logits_peak_bytes). Attention's
    heads x context term is counted at the full context: a micro-batch of b rows of width w keeps
    b x w x w <= micro_tokens x max_sequence_length of it, the bound under a token budget too."""
    pb = param_bytes(cfg)
    tokens = micro_tokens / lay.cp
    context = score_context(cfg, profile, micro_tokens)
    split_seq = lay.tp if lay.sequence_parallel else 1
    per_layer = []
    for i in st.layers:
        replicated, split = layer_elements(shape, i, profile, context)
        per_layer.append(replicated / split_seq + split / lay.tp)
    kept = recomputed_elements(cfg, per_layer, cfg.model.hidden_size / split_seq)
    in_flight = min(lay.pp - stage, in_flight_batches)
    if lay.virtual_stages > 1:
        in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.virtual_stages)
    total = kept * tokens * pb * in_flight + score_working_bytes(shape, lay, profile, context, tokens, pb)
    if st.last:
        total += final_elements(profile, cfg.model.hidden_size) / split_seq * tokens * pb
        total += logits_peak_bytes(cfg.model.logprob_chunk_tokens, tokens, micro_rows, shape.vocab / lay.tp, pb)
    return total


def score_context(cfg: RLSRConfig, profile: str, micro_tokens: int) -> int:
    """Keys per query of the s x s attention scores a micro-batch materialises (0: none). The mask
    layout: rows of max_sequence_length. THD (models/packed_seq.py): none on the TE spec (flash /
    fused attention over cu_seqlens); the local spec turns the stream back into one mask over all of
    it, so its scores span the whole micro-batch."""
    if attention_layout(cfg.model.attention_layout, profile == "te") == "mask":
        return cfg.model.max_sequence_length
    return 0 if profile == "te" else micro_tokens


def score_working_bytes(shape: ModelShape, lay: Layout, profile: str, context: int, tokens: float, pb: int) -> float:
    """The s x s matrices of the one layer being computed besides the probabilities every layer keeps
    (planner/activations.SCORE_WORKING_COPIES): heads / TP x context per token each."""
    return SCORE_WORKING_COPIES[profile] * shape.cfg.num_attention_heads / lay.tp * context * tokens * pb


def logits_peak_bytes(chunk_tokens: int, tokens: float, micro_batch: int, local_vocab: float, pb: int) -> float:
    """The most the output layer and the loss hold at once: the logits, and either one chunk's fp32
    temporaries of the loss (models/logprobs.py) or, for micro-batches of several rows, a second
    copy of the logits: megatron's GPTModel returns `logits.transpose(0, 1).contiguous()` (a copy
    unless there is one row; core_v0.16.1 and core_v0.19.0 megatron/core/models/gpt/gpt_model.py)
    and the output layer's backward makes their [s, b] gradient contiguous again."""
    logits = tokens * local_vocab * pb
    chunk = min(chunk_tokens or tokens, tokens)
    return logits + max(logits if micro_batch > 1 else 0.0, chunk * local_vocab * LOGIT_CHUNK_BYTES)


def recomputed_elements(cfg: RLSRConfig, per_layer: list[float], layer_input: float) -> float:
    """Elements per token a stage keeps at the backward pass's peak under megatron's full recompute.

    `uniform`: the layers run in groups of `recompute_num_layers`; only each group's input is kept
    and one group at a time is rebuilt. `block`: the first `recompute_num_layers` layers of the
    stage keep only their input (rebuilt one at a time, once the backward pass has freed the
    later layers), the others keep everything. Without full
    recompute every layer keeps everything (selective recompute is not modelled: it drops only the
    local spec's attention probabilities)."""
    m = cfg.model
    if m.recompute_granularity != "full" or not per_layer:
        return sum(per_layer)
    n = m.recompute_num_layers or 1
    if m.recompute_method == "block":
        n = min(n, len(per_layer))
        # the backward pass frees the later layers' activations before it rebuilds the first ones
        return n * layer_input + max(sum(per_layer[n:]), max(per_layer[:n]))
    groups = [per_layer[i:i + n] for i in range(0, len(per_layer), n)]
    return len(groups) * layer_input + max(sum(g) for g in groups)


def kv_bytes_per_token(cfg: RLSRConfig, shape: ModelShape, lay: Layout) -> float:
    """KV cache per token of one sequence on one engine GPU (bf16 on GPUs, fp32 on the CPU)."""
    engine_dtype = param_bytes(cfg) if cfg.rollout.engine == "torch" else 2
    per_token = cfg.model.num_layers * shape.kv_cache_elements() * engine_dtype
    # Heads split over the engine's GPUs (replicated past the KV head count); MLA's latent cache is
    # one vector per token, so an MLA engine splits sequences (attention data parallel) instead.
    shard = lay.engine_tp if cfg.model.multi_latent_attention else min(lay.engine_tp, shape.kv_heads)
    return per_token / shard


def engine_weight_bytes(cfg: RLSRConfig, shape: ModelShape, lay: Layout) -> float:
    """A TensorRT-LLM engine's bf16 weights per GPU (the HF tensors, unpadded vocabulary): split over
    its GPUs, except that an MLA model runs attention data-parallel (see kv_bytes_per_token), so only
    its routed experts are split. Also what a shard-only refit hands each worker (planner/refit.py)."""
    if not cfg.model.multi_latent_attention:
        return shape.hf_params() * 2 / lay.engine_tp
    experts = shape.moe_layers * shape.expert_params() if cfg.model.num_moe_experts else 0
    return (experts / lay.engine_tp + shape.hf_params() - experts) * 2


def encoder_window(cfg: RLSRConfig) -> int:
    return cfg.reward.encoder_max_tokens or ENCODERS[cfg.reward.encoder].max_tokens


def reward_bytes(cfg: RLSRConfig, on_gpu: bool) -> float:
    """The encoder's weights and one batch's live intermediates on a GPU that holds it."""
    r = cfg.reward
    if r.backend == "openai" or (r.backend == "ray" and r.ray_gpus_per_actor == 0):
        return 0.0  # a remote embeddings server, or CPU actors
    enc, dtype = ENCODERS[r.encoder], (2 if on_gpu else 4)
    tokens = r.tokens_per_batch or r.batch_size * min(cfg.rollout.max_new_tokens, encoder_window(cfg))
    return enc.params * dtype + tokens * enc.hidden * ENCODER_WORK_ELEMENTS * dtype


def plan_memory(cfg: RLSRConfig, shape: ModelShape, lay: Layout, dev: Device, mode: str) -> Memory:
    """Memory of the most loaded pipeline stage (the maximum of each stage's peak phase)."""
    profile = "local" if dev.name == "cpu" else "te"
    best: Memory | None = None
    for s, st in enumerate(stage_params(shape, lay)):
        memory = _stage_memory(cfg, shape, lay, dev, mode, profile, s, st)
        if best is None or memory.peak > best.peak:
            best = memory
    return best


def _stage_memory(cfg, shape, lay, dev, mode, profile, s, st) -> Memory:
    usable, pb, notes = usable_bytes(dev), param_bytes(cfg), []
    items = training_state(cfg, st, lay)
    if mode == "sft":
        micro, budget = cfg.sft.micro_batch_size, cfg.sft.max_tokens_per_microbatch
        rows = cfg.sft.global_batch_size // lay.dp
    else:
        micro, budget = cfg.grpo.micro_batch_size, cfg.grpo.max_tokens_per_microbatch
        rows = cfg.grpo.prompts_per_step // lay.dp * cfg.grpo.num_generations // cfg.grpo.mini_batches_per_step
    # A token budget bounds every micro-batch (models/microbatches.py); how many there are depends on
    # the lengths, at most one per row (which only matters for the pipeline's in-flight count).
    micro_tokens = budget or micro * cfg.model.max_sequence_length
    n_micro = max(1, rows if budget else rows // micro)
    # Under a budget a micro-batch of rows shorter than the longest has several rows: counted so.
    micro_rows = 2 if budget else micro
    items["activations"] = activation_bytes(cfg, shape, lay, st, s, profile, micro_tokens, micro_rows, n_micro)
    if profile == "te" and score_context(cfg, profile, micro_tokens):
        notes.append("activations: model.attention_layout=mask runs TE's unfused `arbitrary` attention, whose "
                     "s x s scores are counted (thd / auto avoids them)")
    state = items["weights"] + items["grads"] + items["optimizer"]
    if mode == "sft":
        return Memory(items, {"training": state + items["activations"]}, usable, s, notes,
                      {"training": list(items)})

    items["reference"] = (st.dense + st.expert) * pb
    items["reward encoder"] = reward_bytes(cfg, dev.name != "cpu")
    resident = items["weights"] + items["reference"] + items["reward encoder"]
    engine = cfg.rollout.engine
    items["rollout engine weights"] = engine_weight_bytes(cfg, shape, lay) if engine == "trtllm" else 0.0
    # separate engines: the generation phase is an engine GPU's, which holds nothing of the trainer
    generation = (0.0 if lay.rollout_gpus else resident) + items["rollout engine weights"]
    if engine == "torch":
        generation += items["grads"] + items["optimizer"]
    elif lay.rollout_gpus:
        notes.append(f"generation: on the engines' own {lay.rollout_gpus} GPUs (rollout.gpus); its phase and the "
                     f"rollout items are an engine GPU's")
    else:
        notes.append("generation: policy grads and optimizer state offloaded to host memory")
    kv_token = kv_bytes_per_token(cfg, shape, lay)
    seqs = cfg.grpo.prompts_per_step * cfg.grpo.num_generations / lay.engines
    seq_bytes = cfg.model.max_sequence_length * kv_token
    needed = math.ceil(seqs) * seq_bytes
    pool = needed if engine == "torch" else min(needed, max(usable - generation, 0.0))
    if engine != "torch" and pool < min(seqs, MIN_CONCURRENT_SEQUENCES) * seq_bytes:
        pool = min(seqs, MIN_CONCURRENT_SEQUENCES) * seq_bytes  # the minimum; the phase then overflows
    items["rollout KV cache"] = pool
    held = {
        "generation": (["rollout engine weights", "rollout KV cache"] if lay.rollout_gpus else
                       ["weights", "reference", "reward encoder", "rollout engine weights", "rollout KV cache"]
                       + (["grads", "optimizer"] if engine == "torch" else [])),
        "logprobs": ["weights", "grads", "optimizer", "reference", "reward encoder"],
        "training": ["weights", "grads", "optimizer", "reference", "reward encoder", "activations"],
    }
    if cfg.reward.offload_between_steps:
        for phase in ("logprobs", "training"):
            held[phase].remove("reward encoder")
    phases = {phase: sum(items[n] for n in names) for phase, names in held.items()}
    return Memory(items, phases, usable, s, notes, held)
