"""End-to-end RLSR runs through the command line: artifacts, exact resume, and 2-rank launches."""

import json
import shutil
from pathlib import Path

import pytest

from cli_runner import cli

TINY = [
    "pretrain.steps=20",
    "grpo.prompts_per_step=4",
    "grpo.num_generations=4",
    "grpo.micro_batch_size=8",
    "rollout.max_new_tokens=12",
    "trainer.progress_bar=false",
]


def run(args: list[str], nprocs: int = 1, timeout: int = 600, expect: int = 0) -> str:
    """`nemo-rlsr train --config conf/rlsr_tiny.yaml <args>` (cli_runner.cli)."""
    return cli("train", "rlsr_tiny.yaml", args, nprocs=nprocs, timeout=timeout, expect=expect)


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_run_writes_artifacts_and_resume_reproduces_next_steps_exactly(tmp_path):
    full = tmp_path / "full"
    output = run(TINY + ["trainer.steps=4", "trainer.checkpoint_every=2", f"trainer.output_dir={full}"])
    assert "mean reward, first 10 steps" in output and "held-out prompts, trained" in output

    logged = records(full)
    assert sorted(logged) == [1, 2, 3, 4]
    for key in ["reward/mean", "reward/std", "kl", "entropy", "loss", "grad_norm", "clip_fraction",
                "token_mult_prob_error", "time/step", "response/mean_length", "response/topic_subject_rate"]:
        assert all(key in r for r in logged.values()), key
    assert (full / "reward.png").stat().st_size > 5000
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 4
    assert set(summary["heldout_trained"]) == {"reward", "own_answer_rate", "topic_subject_rate", "examples"}
    assert (full / "checkpoints" / "latest").read_text().strip() == "step_0000004"

    # Preempted after step 2: drop the later checkpoint and resume from the newest complete one.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    output = run(TINY + ["trainer.steps=4", "trainer.checkpoint_every=2", f"trainer.output_dir={resumed}"]
                 + ["--resume", "auto"])
    assert "resumed from" in output and "step_0000002" in output
    again = records(resumed)
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ["loss", "grad_norm", "reward/mean", "kl", "entropy", "entropy/trend", "reward/tied_group_fraction",
                    "reward/term/cosine/mean"]:  # the trend's window comes back from the checkpoint
            assert again[step][key] == logged[step][key], (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tensor_parallel=1"], ["parallel.tensor_parallel=2"]],
                         ids=["dp2", "tp2"])
def test_torchrun_two_ranks(tmp_path, layout):
    run_dir = tmp_path / "run"
    run(TINY + layout + ["trainer.steps=2", "trainer.heldout_eval=false", f"trainer.output_dir={run_dir}"], nprocs=2)
    logged = records(run_dir)
    assert sorted(logged) == [1, 2]
    assert all(0.0 < r["num_tokens"] for r in logged.values())
    assert all(r["reward/scored_rows"] == 16 for r in logged.values())  # each rollout scored once, by one rank


@pytest.mark.slow
def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    output = run([f"trainer.output_dir={tmp_path}"], timeout=300, expect=2)
    assert "--resume" in output and str(tmp_path) in output


@pytest.mark.slow
def test_config_error_exit_code_and_message(tmp_path):
    output = run(["grpo.num_generatons=4"], timeout=300, expect=2)
    assert "unknown key `grpo.num_generatons`" in output and "<command line>" in output


@pytest.mark.slow
def test_embedded_default_learns_to_answer_the_asked_prompt(tmp_path):
    """The acceptance bar of `make demo`, on the unchanged demo config."""
    run([f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false"], timeout=1200)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reward_last10"] >= summary["reward_first10"] + 0.1, summary
    base, trained = summary["heldout_base"], summary["heldout_trained"]
    assert trained["reward"] > base["reward"], summary
    # answering the asked prompt, not a generic centroid answer
    assert trained["own_answer_rate"] > base["own_answer_rate"] + 0.2, summary
    # naming the asked topic as the subject, not a subjectless "a loyal pet that ..." (issue 17)
    assert trained["topic_subject_rate"] >= 0.9 and trained["reward"] >= 0.85, summary
