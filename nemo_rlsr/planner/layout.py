"""The parallel layout of a config on a cluster, and the divisibility rules it must satisfy.

The rules are megatron-core's (it raises on them at start-up, after minutes of container and
checkpoint loading) plus the trainer's batch split; checking them here refuses a bad recipe in a
second, before a job is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.generation.factory import engine_gpus
from nemo_rlsr.planner.shapes import ModelShape


@dataclass(frozen=True, kw_only=True)
class Layout(ParallelDims):
    """The run's parallel split (distributed/dims.py) on a cluster of `world` devices."""

    world: int  # the trainer's devices
    gpus_per_node: int
    engine_tp: int
    rollout_gpus: int = 0  # separate TensorRT-LLM engines' GPUs (rollout.gpus), beside `world`

    @property
    def dp(self) -> int:
        return self.data_parallel(self.world)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights (their optimizer state is sharded over it)."""
        return self.expert_data_parallel(self.world)

    @property
    def engines(self) -> int:
        return (self.rollout_gpus or self.world) // self.engine_tp

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.gpus_per_node)

    def spans_nodes(self, group_size: int) -> bool:
        """Whether a group of `group_size` consecutive ranks leaves one node."""
        return group_size > self.gpus_per_node

    @classmethod
    def of(cls, cfg: RLSRConfig, nodes: int, gpus_per_node: int) -> "Layout":
        """`nodes`: the trainer's (separate engines' nodes are not among them)."""
        return cls.from_config(cfg.parallel, world=nodes * gpus_per_node, gpus_per_node=gpus_per_node,
                               engine_tp=engine_gpus(cfg), rollout_gpus=separate_engine_gpus(cfg))


def separate_engine_gpus(cfg: RLSRConfig) -> int:
    """rollout.gpus under separate TensorRT-LLM engines (generation/trtllm_worker.py), else 0."""
    r = cfg.rollout
    return r.gpus if r.placement == "separate" and r.engine == "trtllm" else 0


def layout_problems(cfg: RLSRConfig, shape: ModelShape, lay: Layout, mode: str) -> list[str]:
    """Every rule the layout breaks, as sentences naming the keys involved: the split's own, then
    those that depend on the model and the batch."""
    m = cfg.model

    def need(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    out = lay.problems(lay.world)  # the split's own rules (distributed/dims.py)
    if lay.world % lay.model_parallel:
        return out
    need(m.num_attention_heads % lay.tp == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by tensor_parallel={lay.tp}")
    if not m.multi_latent_attention:
        need(shape.kv_heads % lay.tp == 0,
             f"model.num_query_groups={shape.kv_heads} is not divisible by tensor_parallel={lay.tp} "
             f"(megatron shards whole key/value heads)")
    if lay.uneven_stages:
        counts = lay.layers_per_stage(m.num_layers)
        need(sum(counts) == m.num_layers and min(counts) > 0,
             f"model.num_layers={m.num_layers} does not split into pipeline stages {counts}")
    else:
        need(m.num_layers % (lay.pp * lay.virtual_stages) == 0,
             f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel x virtual = "
             f"{lay.pp} x {lay.virtual_stages} (or set parallel.num_layers_in_first/last_pipeline_stage)")
    need(m.max_sequence_length % (2 * lay.cp) == 0,
         f"model.max_sequence_length={m.max_sequence_length} is not divisible by 2 x context_parallel={lay.cp}")
    if m.num_moe_experts:
        need(m.num_moe_experts % lay.ep == 0,
             f"model.num_moe_experts={m.num_moe_experts} is not divisible by expert_parallel={lay.ep}")
    else:
        need(lay.ep == 1, "parallel.expert_parallel > 1 needs an MoE model (model.num_moe_experts)")
    if mode == "rlsr":
        need(lay.rollout_gpus or lay.world % lay.engine_tp == 0,  # separate engines: rollout.gpus (rules.py)
             f"world size {lay.world} is not divisible by rollout.tensor_parallel={lay.engine_tp}")
        out += _batch_problems(cfg, lay.dp)
    else:
        s = cfg.sft
        need(s.global_batch_size % (lay.dp * s.micro_batch_size) == 0,
             f"sft.global_batch_size={s.global_batch_size} does not split into DP={lay.dp} ranks x "
             f"whole sft.micro_batch_size={s.micro_batch_size} micro-batches")
    return out


def _batch_problems(cfg: RLSRConfig, dp: int) -> list[str]:
    """The trainer's own split rule (RLSRTrainer._validate), checked at the planned DP size."""
    g = cfg.grpo
    if g.prompts_per_step % dp:
        return [f"grpo.prompts_per_step={g.prompts_per_step} is not divisible by DP={dp}"]
    rows = g.prompts_per_step // dp * g.num_generations
    if rows % g.mini_batches_per_step or (rows // g.mini_batches_per_step) % g.micro_batch_size:
        return [f"{rows} rollouts per DP rank do not split into grpo.mini_batches_per_step="
                f"{g.mini_batches_per_step} mini-batches of whole grpo.micro_batch_size={g.micro_batch_size}"]
    return []
