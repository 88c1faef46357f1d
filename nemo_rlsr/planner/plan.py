"""`make_plan`: does a config fit a cluster, how much memory per GPU, how long per step.

The Slurm launcher runs this as a preflight (`nemo-rlsr plan ... --launch-env FILE`) and refuses
to start a job that does not fit or that the trainer's start-up checks would refuse on that cluster
(trainer/startup.py, the same function the trainers call); docs/make_recipe_table.py runs it over
every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nemo_rlsr.config import ConfigError, RLSRConfig
from nemo_rlsr.config.rules import size_problems
from nemo_rlsr.planner.checkpoint import CheckpointTime, checkpoint_time, preemption_lead_s
from nemo_rlsr.planner.hardware import GiB, Device, device
from nemo_rlsr.planner.layout import Layout, separate_engine_gpus
from nemo_rlsr.planner.memory import Memory, plan_memory
from nemo_rlsr.planner.shapes import ModelShape
from nemo_rlsr.planner.timing import StepTime, plan_time

MODES = ("rlsr", "sft")


def vocab_size(cfg: RLSRConfig) -> int:
    """model.vocab_size, or the size of the tokenizer the trainer would build for `data.*`."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from nemo_rlsr.data.dataset import load_training_data

    return load_training_data(cfg.data, log=lambda line: None).tokenizer.vocab_size


@dataclass
class Plan:
    cfg: RLSRConfig
    mode: str
    device: Device
    layout: Layout
    shape: ModelShape
    memory: Memory | None = None
    time: StepTime | None = None
    checkpoint: CheckpointTime | None = None
    problems: list[str] = field(default_factory=list)
    engine_nodes: int = 0  # the allocation's last nodes, for separate TensorRT-LLM engines

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def preemption_lead_s(self) -> int | None:
        """The `#SBATCH --signal=B:USR1@N` a job of this plan needs (planner/checkpoint.py)."""
        if self.time is None or self.checkpoint is None:
            return None
        return preemption_lead_s(self.time.total, self.checkpoint.seconds)

    @property
    def needs_ray(self) -> bool:
        return self.mode == "rlsr" and (self.cfg.rollout.engine == "trtllm" or self.cfg.reward.backend == "ray")


def make_plan(cfg: RLSRConfig, nodes: int | None = None, gpus_per_node: int | None = None,
              gpu: str | None = None, mode: str = "rlsr") -> Plan:
    """Plan `cfg` on `nodes` x `gpus_per_node` `gpu`s (each defaults to the config's `cluster`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    counts = size_problems(cfg, mode)
    if counts:  # nothing below means anything without them (the CLI exits 2)
        raise ConfigError("cannot plan these sizes:\n  " + "\n  ".join(counts))
    nodes = nodes or cfg.cluster.nodes
    gpus_per_node = gpus_per_node or cfg.cluster.gpus_per_node
    dev = device(gpu or cfg.cluster.gpu)
    shape = ModelShape.build(cfg.model, vocab_size(cfg))
    engine_gpus = separate_engine_gpus(cfg) if mode == "rlsr" else 0
    engine_nodes = -(-engine_gpus // gpus_per_node)  # separate engines take whole nodes (slurm/launch.sh)
    lay = Layout.of(cfg, max(nodes - engine_nodes, 1), gpus_per_node)
    plan = Plan(cfg, mode, dev, lay, shape, engine_nodes=engine_nodes)
    if engine_nodes and (engine_gpus % gpus_per_node or engine_nodes >= nodes):
        plan.problems = [f"rollout.gpus={engine_gpus} must be whole nodes of {gpus_per_node} GPUs, fewer than the "
                         f"{nodes} node(s): the separate engines take the last nodes of the allocation, the trainer "
                         f"the others"]
        return plan
    # Every rule the trainer checks at start-up, on a node of these GPUs in our image.
    from nemo_rlsr.trainer.startup import Machine, startup_problems  # (it imports the planner's layout rules)

    plan.problems = startup_problems(cfg, Machine.container(lay.world, dev.compute_capability), mode)
    if plan.problems:  # sizes below assume a valid layout
        return plan
    plan.memory = plan_memory(cfg, shape, lay, dev, mode)
    plan.time = plan_time(cfg, shape, lay, dev, plan.memory, mode)
    plan.checkpoint = checkpoint_time(cfg, shape, lay)
    if plan.memory.peak > plan.memory.usable:
        m = plan.memory
        biggest = m.largest(m.peak_phase)
        plan.problems.append(
            f"the {m.peak_phase} phase needs {m.peak / GiB:.1f} GiB per GPU on pipeline stage {m.stage}, "
            f"{dev.name} leaves {m.usable / GiB:.1f} GiB usable (largest: "
            + ", ".join(f"{k} {v / GiB:.1f}" for k, v in biggest) + ")"
        )
    return plan


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: Plan, title: str = "") -> str:
    lay, shape, cfg = plan.layout, plan.shape, plan.cfg
    lines = [f"nemo-rlsr plan {title} (mode {plan.mode})".replace("  ", " "),
             f"cluster: {lay.nodes} node(s) x {lay.gpus_per_node} {plan.device.name} = {lay.world} devices; "
             f"TP {lay.tp} PP {lay.pp} (virtual {lay.virtual_stages}) CP {lay.cp} EP {lay.ep} DP {lay.dp}"
             + (f"; rollout {cfg.rollout.engine}, {lay.engines} engine(s) of {lay.engine_tp} GPU(s)"
                if plan.mode == "rlsr" else "")
             + (f" on {plan.engine_nodes} more node(s) of their own" if plan.engine_nodes else ""),
             f"model: {_count(shape.total_params())} parameters, {_count(shape.active_params())} active "
             f"per token, padded vocab {shape.vocab}, {cfg.model.params_dtype}"]
    if plan.memory:
        m = plan.memory
        lines.append(f"memory per device, GiB (pipeline stage {m.stage}):")
        lines += [f"  {name:<24}{value / GiB:9.2f}" for name, value in m.items.items()]
        lines += [f"  phase {name:<18}{value / GiB:9.2f}" + ("   <- peak" if name == m.peak_phase else "")
                  for name, value in m.phases.items()]
        lines.append(f"  {'usable':<24}{m.usable / GiB:9.2f}   ({plan.device.memory_bytes / GiB:.1f} total, "
                     f"{plan.device.runtime_reserve_bytes / GiB:.1f} runtime reserve, allocator headroom)")
        lines += [f"  note: {n}" for n in m.notes]
    if plan.time:
        t = plan.time
        lines.append(f"step time estimate, s ({plan.device.name}; assumptions in nemo_rlsr/planner/hardware.py):")
        lines += [f"  {name:<24}{value:9.1f}" for name, value in t.phases.items()]
        lines.append(f"  {'total':<24}{t.total:9.1f}" + ("   = max(generation, the rest) + refit" if t.overlapped else ""))
        lines += [f"  note: {n}" for n in t.notes]
    if plan.checkpoint:
        c = plan.checkpoint
        lines.append(f"checkpoint: {c.total_bytes / 1e9:.1f} GB, {c.busiest_node_bytes / 1e9:.1f} GB from the busiest "
                     f"node: save {c.write_s:.0f} s + checksums {c.verify_s:.0f} s (planner/checkpoint.py)")
        lines.append(f"preemption warning: {plan.preemption_lead_s} s (#SBATCH --signal=B:USR1@{plan.preemption_lead_s})")
    lines.append("verdict: fits" if plan.fits else "verdict: DOES NOT FIT\n  " + "\n  ".join(plan.problems))
    return "\n".join(lines)


def write_launch_env(plan: Plan, path: str | Path) -> None:
    """What the Slurm launcher needs from the config, as shell assignments it can `source`."""
    values = {
        "NEMO_RLSR_FITS": int(plan.fits),
        "NEMO_RLSR_WORLD_SIZE": plan.layout.world,
        "NEMO_RLSR_NEEDS_RAY": int(plan.needs_ray),
        "NEMO_RLSR_ENGINE_NODES": plan.engine_nodes,
        "NEMO_RLSR_PEAK_GIB": f"{plan.memory.peak / GiB:.1f}" if plan.memory else "unknown",
        "NEMO_RLSR_SIGNAL_LEAD_S": plan.preemption_lead_s or "unknown",
        "NEMO_RLSR_OUTPUT_DIR": plan.cfg.trainer.output_dir,
    }
    Path(path).write_text("".join(f"{k}='{v}'\n" for k, v in values.items()))
