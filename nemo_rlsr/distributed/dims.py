"""How a run splits its model over devices: one `ParallelDims`, built from `cfg.parallel`, passed whole.

Every component that depends on the split takes this one object: `init_distributed` (process groups),
`build_gpt` / `transformer_config` (the model of this rank), `MegatronPolicy` (through the
`ParallelContext` that init_distributed returns, a ParallelDims plus this process's place in it), the
planner's `Layout` (the same split on a cluster it has not started yet). The divisibility rules that
depend on the split and the world size alone live here (`problems`); the rules that also depend on the
model or the batch are the planner's (planner/layout.py), which starts from these.

Pure: no torch import, so `nemo-rlsr plan` can use it on a machine without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from nemo_rlsr.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """The parallel split of the model (megatron-core's sizes), independent of the world size.

    Data parallelism is what the world size leaves: `data_parallel(world_size)`."""

    tp: int = 1  # tensor parallel: each layer's weights split over tp ranks
    pp: int = 1  # pipeline parallel: the layers split into pp stages
    cp: int = 1  # context parallel: each sequence split over cp ranks (models/context_parallel.py)
    ep: int = 1  # expert parallel: each rank holds num_moe_experts / ep experts of every MoE layer
    etp: int = 1  # tensor parallelism inside each expert
    vpp: int | None = None  # interleaved pipeline: model chunks per PP rank (None: one chunk, plain 1F1B)
    first_stage_layers: int | None = None  # uneven pipeline stages: layers of the first / last stage
    last_stage_layers: int | None = None  # (None: an even split)
    sequence_parallel: bool = False  # activations outside the TP regions split over TP by sequence
    seed: int = 1234  # every RNG of every rank is seeded from it (init_distributed)
    timeout_s: int = 600  # collective timeout of the process group

    @classmethod
    def from_config(cls, p: ParallelConfig, **extra):
        """The dims `cfg.parallel` asks for; `extra`: the fields a subclass adds (planner.layout.Layout)."""
        return cls(
            tp=p.tensor_parallel, pp=p.pipeline_parallel, cp=p.context_parallel, ep=p.expert_parallel,
            etp=p.expert_tensor_parallel, vpp=p.virtual_pipeline_parallel,
            first_stage_layers=p.num_layers_in_first_pipeline_stage,
            last_stage_layers=p.num_layers_in_last_pipeline_stage,
            sequence_parallel=p.sequence_parallel, seed=p.seed, timeout_s=p.collective_timeout_s, **extra,
        )

    def dims_fields(self) -> dict:
        """This object's ParallelDims fields, to build a subclass around them (parallel.ParallelContext)."""
        return {f.name: getattr(self, f.name) for f in fields(ParallelDims)}

    def megatron_sizes(self, experts: bool = True) -> dict[str, int | None]:
        """The split in megatron-core's keywords, which `initialize_model_parallel` and
        `TransformerConfig` share; `experts=False`: without the two expert sizes (a dense model's
        config leaves them at megatron's defaults)."""
        sizes = {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                 "context_parallel_size": self.cp, "virtual_pipeline_model_parallel_size": self.vpp}
        if experts:
            sizes.update(expert_model_parallel_size=self.ep, expert_tensor_parallel_size=self.etp)
        return sizes

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model's dense weights between them: tp x cp x pp."""
        return self.tp * self.cp * self.pp

    @property
    def virtual_stages(self) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        return self.vpp or 1

    @property
    def uneven_stages(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size on `world_size` ranks (CP ranks of one DP rank see the same rows)."""
        return world_size // self.model_parallel

    def expert_data_parallel(self, world_size: int) -> int:
        """Data-parallel size of the expert weights: MoE layers regroup the same ranks as
        etp x ep x (expert DP) x pp (their optimizer state is sharded over it)."""
        return world_size // (self.ep * self.etp * self.pp)

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Layers of each pipeline stage: the first / last as configured, the rest split evenly."""
        fixed = {0: self.first_stage_layers, self.pp - 1: self.last_stage_layers} if self.pp > 1 else {}
        fixed = {s: n for s, n in fixed.items() if n is not None}
        middle = self.pp - len(fixed)
        even = (num_layers - sum(fixed.values())) // middle if middle else 0
        return [fixed.get(s, even) for s in range(self.pp)]

    def problems(self, world_size: int) -> list[str]:
        """Every rule of the split itself that `world_size` ranks break (megatron-core raises on them
        in `initialize_model_parallel` or at build time), as sentences naming the keys."""
        if world_size % self.model_parallel:
            return [f"world size {world_size} is not divisible by tensor x pipeline x context parallel = "
                    f"{self.tp} x {self.pp} x {self.cp}"]
        out = []
        if world_size % (self.ep * self.etp * self.pp):
            out.append(f"world size {world_size} is not divisible by expert x expert-tensor x pipeline parallel = "
                       f"{self.ep} x {self.etp} x {self.pp}")
        if self.uneven_stages and (self.pp == 1 or self.virtual_stages > 1):
            out.append("uneven pipeline stages need pipeline_parallel > 1 and no virtual stages")
        if self.virtual_stages > 1 and self.pp == 1:
            out.append("parallel.virtual_pipeline_parallel needs pipeline_parallel > 1")
        if self.sequence_parallel and self.tp == 1:
            out.append("parallel.sequence_parallel needs tensor_parallel > 1")
        return out

    def validate(self, world_size: int) -> None:
        problems = self.problems(world_size)
        if problems:
            raise ConfigError(f"this parallel layout cannot run on {world_size} ranks:\n  " + "\n  ".join(problems))
