"""`nemo-rlsr`'s exit codes, each through the real command line (nemo_rlsr/cli.py documents them).

    0   done: every end-to-end run (tests/test_rlsr_run.py, test_sft.py, test_eval_report.py, ...)
    2   a bad config: unknown key (test_rlsr_run.py), start-up rules (test_recipes_startup.py, and
        below: the keys whose problems used to surface later as tracebacks); a checkpoint path that is
        not one (below); `plan` (test_planner.py)
    3   non-finite updates in a row (test_reliability_run.py, train and sft)
    75  preempted (test_reliability_run.py, test_sft_reliability.py)
    1   a bad data row (below), or any other error
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nemo_rlsr.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_train_lists_every_config_problem_and_exits_2_before_anything_starts(tmp_path):
    """Keys whose problems used to stop the run after the model was built (the guard's, the
    preemption handler's, the reward's, the sampler's, the reference's), each a traceback and exit 1."""
    run_dir = tmp_path / "run"
    result = cli("train", "--config", str(REPO / "conf/rlsr_tiny.yaml"), f"trainer.output_dir={run_dir}",
                 "trainer.max_consecutive_nonfinite=0", "trainer.preemption_signals=[SIGNOPE]",
                 "reward.repetition_mode=loops", "reward.backend=nope", "rollout.temperature=0", "rollout.top_p=2",
                 "grpo.reference_placement=gpu", "grpo.num_generations=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.startswith("config error:"), result.stderr[-3000:]
    for key in ("trainer.max_consecutive_nonfinite", "trainer.preemption_signals", "reward.repetition_mode",
                "reward.backend", "rollout.temperature", "rollout.top_p", "grpo.reference_placement",
                "grpo.num_generations"):
        assert key in result.stderr, key
    assert not run_dir.exists()  # refused before the run directory, data or model


def test_sft_lists_its_config_problems_and_exits_2(tmp_path):
    result = cli("sft", "--config", str(REPO / "conf/sft_tiny.yaml"), f"trainer.output_dir={tmp_path / 'run'}",
                 "sft.micro_batch_size=0", "sft.min_lr_ratio=2", "trainer.max_consecutive_nonfinite=0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for key in ("sft.micro_batch_size", "sft.min_lr_ratio", "trainer.max_consecutive_nonfinite"):
        assert key in result.stderr, key


def test_a_bad_data_row_exits_1_with_file_row_and_reason(tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "what is a lemon ?"}, {"role": "assistant", "content": "a fruit ."}]}
    rows.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = cli("sft", "--config", str(REPO / "conf/sft_tiny.yaml"), f"trainer.output_dir={tmp_path / 'run'}",
                 f"data.path={rows}", "data.format=tulu", "data.strict=true")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"data error: {rows}:2: no_assistant_turn" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_plan_of_sizes_that_are_not_counts_exits_2():
    """The layout rules and the memory model divide by these (a ZeroDivisionError traceback before)."""
    result = cli("plan", "--config", str(REPO / "conf/rlsr_qwen7b_sb.yaml"), "parallel.tensor_parallel=0",
                 "grpo.micro_batch_size=0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "parallel.tensor_parallel must be >= 1" in result.stderr and "grpo.micro_batch_size" in result.stderr
    assert "Traceback" not in result.stderr
