"""How long a checkpoint save takes, and the preemption warning a Slurm job needs for it.

What a save writes (trainer/checkpoint.py, megatron dist_checkpointing, default strategy): a tensor
replicated over ranks is written once, by its first replica, so the model weights come from the
data-parallel rank 0 of each pipeline stage (the first `tp` ranks of the stage; routed experts: the
first `ep x etp`); the DistributedOptimizer's state (`dp_reshardable`) is written by every rank,
its own shard (without the distributed optimizer, by the weights' writers). The node holding the
writers of the weights writes the most, and the save lasts as long as that node takes. Then every
file is read back once for the manifest's sha256 (`trainer.checkpoint_checksums`), shared
round-robin over the ranks. Ranks are placed as megatron orders them (tensor parallel fastest,
pipeline stage slowest) on consecutive GPUs of consecutive nodes.

Preemption: a signal is noticed at the end of the step in progress, so a job needs, between the
warning and its end, at worst a whole step and then a save: `preemption_lead_s` is that, with a
safety factor for the planner's unmeasured assumptions and a fixed part for the launcher and the
signal's path, rounded up to a minute. slurm/set_signal_lead.py writes it into each recipe's
`#SBATCH --signal=B:USR1@N`, and tests/test_slurm.py checks that the scripts carry it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.planner.layout import Layout
from nemo_rlsr.planner.memory import param_bytes, stage_params
from nemo_rlsr.planner.shapes import ModelShape

# ASSUMED: what one node sustains writing (and reading back) checkpoint files on a shared parallel
# file system (Lustre / GPFS) while other jobs use it too. Deliberately low: a clients' peak is
# several times this, but underestimating it only starts a preempted save early, overestimating
# it loses the checkpoint.
CHECKPOINT_BYTES_PER_S_PER_NODE = 1e9
LEAD_SAFETY = 1.5  # ASSUMED: the planner's step time and this save time are not calibrated yet
LEAD_FIXED_S = 60  # the signal's path through the launcher, the final collective, process exit


@dataclass(frozen=True)
class CheckpointTime:
    total_bytes: float  # the whole checkpoint (weights + optimizer state)
    busiest_node_bytes: float  # what the node with the most to write writes
    write_s: float
    verify_s: float  # reading every file back for the manifest's sha256

    @property
    def seconds(self) -> float:
        return self.write_s + self.verify_s


def rank_write_bytes(cfg: RLSRConfig, shape: ModelShape, lay: Layout) -> list[float]:
    """Bytes each rank (global rank order) writes in one save."""
    pb = param_bytes(cfg)
    optim = 12 if pb == 2 else 8  # fp32 main copy (bf16 params) + Adam's two moments
    distributed = cfg.optimizer.use_distributed_optimizer
    per_stage = lay.world // lay.pp
    stages = stage_params(shape, lay)
    out = []
    for rank in range(lay.world):
        stage, within = divmod(rank, per_stage)
        st = stages[stage]
        dense_writer, expert_writer = within < lay.tp, within < lay.ep * lay.etp
        written = dense_writer * st.dense * pb + expert_writer * st.expert * pb
        if distributed:  # StageParams are per GPU of one replica; the optimizer shards them over DP x CP
            written += st.dense * optim / (lay.dp * lay.cp) + st.expert * optim / lay.expert_dp
        else:
            written += dense_writer * st.dense * optim + expert_writer * st.expert * optim
        out.append(written)
    return out


def checkpoint_time(cfg: RLSRConfig, shape: ModelShape, lay: Layout,
                    bytes_per_s_per_node: float = CHECKPOINT_BYTES_PER_S_PER_NODE) -> CheckpointTime:
    per_rank = rank_write_bytes(cfg, shape, lay)
    per_node = [sum(per_rank[n * lay.gpus_per_node:(n + 1) * lay.gpus_per_node]) for n in range(lay.nodes)]
    total = sum(per_rank)
    verify = total / lay.nodes / bytes_per_s_per_node if cfg.trainer.checkpoint_checksums else 0.0
    return CheckpointTime(total, max(per_node), max(per_node) / bytes_per_s_per_node, verify)


def preemption_lead_s(step_s: float, save_s: float) -> int:
    """Seconds of warning a job needs to finish the step in progress and save: whole minutes."""
    return 60 * math.ceil((LEAD_SAFETY * (step_s + save_s) + LEAD_FIXED_S) / 60)
