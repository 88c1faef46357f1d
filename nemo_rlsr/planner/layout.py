"""The parallel layout of a config on a cluster, and the divisibility rules it must satisfy.

The rules are megatron-core's (it raises on them at start-up, after minutes of container and
checkpoint loading) plus the trainer's batch split; checking them here refuses a bad recipe in a
second, before a job is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.generation.factory import engine_gpus
from nemo_rlsr.planner.shapes import ModelShape


@dataclass(frozen=True)
class Layout:
    world: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    vpp: int
    sequence_parallel: bool
    engine_tp: int
    first_layers: int | None = None
    last_layers: int | None = None

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights (their optimizer state is sharded over it)."""
        return self.world // (self.ep * self.etp * self.pp)

    @property
    def engines(self) -> int:
        return self.world // self.engine_tp

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.gpus_per_node)

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers per pipeline stage: the first/last as configured, the rest split evenly."""
        fixed = {0: self.first_layers, self.pp - 1: self.last_layers} if self.pp > 1 else {}
        fixed = {s: n for s, n in fixed.items() if n is not None}
        middle = self.pp - len(fixed)
        even = (num_layers - sum(fixed.values())) // middle if middle else 0
        return [fixed.get(s, even) for s in range(self.pp)]

    def spans_nodes(self, group_size: int) -> bool:
        """Whether a group of `group_size` consecutive ranks leaves one node."""
        return group_size > self.gpus_per_node

    @classmethod
    def of(cls, cfg: RLSRConfig, nodes: int, gpus_per_node: int) -> "Layout":
        p = cfg.parallel
        return cls(
            world=nodes * gpus_per_node, gpus_per_node=gpus_per_node, tp=p.tensor_parallel,
            pp=p.pipeline_parallel, cp=p.context_parallel, ep=p.expert_parallel,
            etp=p.expert_tensor_parallel, vpp=p.virtual_pipeline_parallel or 1,
            sequence_parallel=p.sequence_parallel,
            engine_tp=engine_gpus(cfg),
            first_layers=p.num_layers_in_first_pipeline_stage, last_layers=p.num_layers_in_last_pipeline_stage,
        )


def layout_problems(cfg: RLSRConfig, shape: ModelShape, lay: Layout, mode: str) -> list[str]:
    """Every rule the layout breaks, as sentences naming the keys involved."""
    m, out = cfg.model, []

    def need(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    if lay.world % (lay.tp * lay.pp * lay.cp):
        return [f"world size {lay.world} is not divisible by tensor x pipeline x context parallel = "
                f"{lay.tp} x {lay.pp} x {lay.cp}"]
    need(m.num_attention_heads % lay.tp == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by tensor_parallel={lay.tp}")
    if not m.multi_latent_attention:
        need(shape.kv_heads % lay.tp == 0,
             f"model.num_query_groups={shape.kv_heads} is not divisible by tensor_parallel={lay.tp} "
             f"(megatron shards whole key/value heads)")
    uneven = lay.first_layers is not None or lay.last_layers is not None
    if uneven:
        need(lay.pp > 1 and lay.vpp == 1, "uneven pipeline stages need pipeline_parallel > 1 and no virtual stages")
        counts = lay.stage_layers(m.num_layers)
        need(sum(counts) == m.num_layers and min(counts) > 0,
             f"model.num_layers={m.num_layers} does not split into pipeline stages {counts}")
    else:
        need(m.num_layers % (lay.pp * lay.vpp) == 0,
             f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel x virtual = "
             f"{lay.pp} x {lay.vpp} (or set parallel.num_layers_in_first/last_pipeline_stage)")
    need(lay.vpp == 1 or lay.pp > 1, "parallel.virtual_pipeline_parallel needs pipeline_parallel > 1")
    need(not lay.sequence_parallel or lay.tp > 1, "parallel.sequence_parallel needs tensor_parallel > 1")
    need(m.max_sequence_length % (2 * lay.cp) == 0,
         f"model.max_sequence_length={m.max_sequence_length} is not divisible by 2 x context_parallel={lay.cp}")
    if m.num_moe_experts:
        need(m.num_moe_experts % lay.ep == 0,
             f"model.num_moe_experts={m.num_moe_experts} is not divisible by expert_parallel={lay.ep}")
        need(lay.world % (lay.ep * lay.etp * lay.pp) == 0,
             f"world size {lay.world} is not divisible by expert x expert-tensor x pipeline parallel = "
             f"{lay.ep} x {lay.etp} x {lay.pp}")
    else:
        need(lay.ep == 1, "parallel.expert_parallel > 1 needs an MoE model (model.num_moe_experts)")
    if mode == "rlsr":
        need(lay.world % lay.engine_tp == 0,
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
