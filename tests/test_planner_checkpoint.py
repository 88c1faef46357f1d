"""The planner's checkpoint save time and the preemption warning derived from it (planner/checkpoint.py).

Bytes by hand: bf16 weights (2 B) + the distributed optimizer's fp32 main copy and Adam moments
(12 B) per parameter. The tiny run's real checkpoint sizes are compared with the same model in
tests/test_slurm_cluster.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rlsr.config import load_config
from nemo_rlsr.planner import make_plan
from nemo_rlsr.planner.checkpoint import (CHECKPOINT_BYTES_PER_S_PER_NODE, LEAD_FIXED_S, LEAD_SAFETY,
                                          preemption_lead_s, rank_write_bytes)

REPO = Path(__file__).resolve().parents[1]


def test_qwen32b_checkpoint_bytes_by_hand():
    """TP8 x DP8 on 8 nodes: the weights come from DP rank 0's 8 GPUs, all on node 0; every GPU
    writes 1/64 of the optimizer state. (rel 1e-5: the planner keeps small TP-replicated tensors
    such as the final norm on every TP rank, 0.0001% here.)"""
    plan = make_plan(load_config(REPO / "conf/rlsr_qwen32b_sb.yaml"))
    n = plan.shape.total_params()
    c = plan.checkpoint
    assert c.total_bytes == pytest.approx(14 * n, rel=1e-5)
    assert 455e9 < c.total_bytes < 462e9  # "~460 GB"
    assert c.busiest_node_bytes == pytest.approx(2 * n + 12 * n / 8, rel=1e-5)
    assert c.write_s == pytest.approx(c.busiest_node_bytes / CHECKPOINT_BYTES_PER_S_PER_NODE)
    assert c.verify_s == pytest.approx(14 * n / 8 / CHECKPOINT_BYTES_PER_S_PER_NODE, rel=1e-5)  # read back once, shared
    per_rank = rank_write_bytes(plan.cfg, plan.shape, plan.layout)
    assert per_rank[0] == pytest.approx(2 * n / 8 + 12 * n / 64, rel=1e-5)  # a writer of weights
    assert per_rank[8] == pytest.approx(12 * n / 64, rel=1e-5)  # node 1: optimizer shards only


def test_without_the_distributed_optimizer_dp_rank_0_writes_everything():
    cfg = load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", ["optimizer.use_distributed_optimizer=false"])
    plan = make_plan(cfg)
    per_rank = rank_write_bytes(plan.cfg, plan.shape, plan.layout)
    assert sum(per_rank) == pytest.approx(14 * plan.shape.total_params(), rel=1e-5)
    assert all(b == 0 for b in per_rank[plan.layout.tp:])  # TP2: ranks 0 and 1 are DP rank 0
    no_checksums = make_plan(load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", ["trainer.checkpoint_checksums=false"]))
    assert no_checksums.checkpoint.verify_s == 0


def test_lead_time_covers_a_step_and_a_save_in_whole_minutes():
    assert preemption_lead_s(200, 172) == 660  # 1.5 x 372 + 60 = 618 s, rounded up
    for step, save in [(0.3, 0.0), (59, 1), (205, 172), (125, 466)]:
        lead = preemption_lead_s(step, save)
        assert lead % 60 == 0 and lead >= LEAD_SAFETY * (step + save) + LEAD_FIXED_S > step + save


def test_plan_reports_the_warning_and_the_launch_env_carries_it(tmp_path, capsys):
    from nemo_rlsr.cli import main

    env = tmp_path / "launch.env"
    assert main(["plan", "--config", str(REPO / "conf/rlsr_qwen32b_sb.yaml"), "--launch-env", str(env)]) == 0
    lead = make_plan(load_config(REPO / "conf/rlsr_qwen32b_sb.yaml")).preemption_lead_s
    assert f"preemption warning: {lead} s (#SBATCH --signal=B:USR1@{lead})" in capsys.readouterr().out
    assert f"NEMO_RLSR_SIGNAL_LEAD_S='{lead}'" in env.read_text()
