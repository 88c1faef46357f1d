"""Asynchronous GRPO (rollout.placement=separate, grpo.max_staleness): the rules, and real runs.

The runs are the CLI's on one rank: megatron-core on gloo, the rollout worker a Ray actor on
loopback (generation/rollout_worker.py), MiniLM scoring. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from cli_runner import REPO, logs, run_python, start_cli, wait_all
from test_reliability_run import wait_for_step
from test_rlsr_run import TINY, records, run

from nemo_rlsr.config import load_config
from nemo_rlsr.trainer.manifest import verify_checkpoint
from nemo_rlsr.trainer.preemption import PREEMPTED_EXIT_CODE
from nemo_rlsr.trainer.startup import Machine, startup_problems

SEPARATE = ["rollout.placement=separate"]
STALE_1 = SEPARATE + ["grpo.max_staleness=1", "grpo.tis_cap=2.0"]
SHORT = TINY + ["trainer.heldout_eval=false"]


def problems(overrides: list[str], world_size: int = 1, cuda: bool = False) -> list[str]:
    cfg = load_config(REPO / "conf" / "rlsr_tiny.yaml", overrides)
    machine = Machine.container(world_size, (9, 0) if cuda else None)
    return startup_problems(cfg, machine, "rlsr")


def test_placement_rules_name_the_keys():
    assert problems(STALE_1) == []
    assert problems([]) == []
    assert any("rollout.placement='nowhere'" in p for p in problems(["rollout.placement=nowhere"]))
    assert any("grpo.max_staleness=1 needs rollout.placement=separate" in p for p in problems(["grpo.max_staleness=1"]))
    assert any("grpo.max_staleness must be >= 0" in p for p in problems(SEPARATE + ["grpo.max_staleness=-1"]))
    assert any("needs grpo.tis_cap" in p for p in problems(SEPARATE + ["grpo.max_staleness=1"]))
    assert problems(STALE_1, world_size=2) == []  # data-parallel ranks
    assert problems(STALE_1 + ["parallel.tensor_parallel=2"], world_size=2) == []  # rank 0's peers stream too
    assert problems(STALE_1 + ["rollout.engine=trtllm", "rollout.gpus=4", "rollout.tensor_parallel=4"], world_size=2,
                    cuda=True) == []  # an engine wider than the trainer: its GPUs are not the trainer's
    assert any("grpo.prompts_per_step=1 is not divisible by DP=2" in p
               for p in problems(STALE_1 + ["grpo.prompts_per_step=1"], world_size=2))
    for split in ("pipeline_parallel", "context_parallel"):
        assert any(f"data- and tensor-parallel trainers, not parallel.{split}=2" in p
                   for p in problems(STALE_1 + [f"parallel.{split}=2"], world_size=2))
    assert any("rollout.engine=torch is built for the CPU only" in p for p in problems(STALE_1, cuda=True))
    assert any("megatron samples on the trainer's own module" in p
               for p in problems(STALE_1 + ["rollout.engine=megatron"], cuda=True))
    # TensorRT-LLM engines on GPUs of their own (generation/trtllm_worker.py): rollout.gpus
    trtllm = STALE_1 + ["rollout.engine=trtllm", "rollout.tensor_parallel=2"]
    assert problems(trtllm + ["rollout.gpus=4"], world_size=2, cuda=True) == []
    for gpus in (0, 3):
        assert any(f"rollout.gpus={gpus} must be a positive multiple of rollout.tensor_parallel=2" in p
                   for p in problems(trtllm + [f"rollout.gpus={gpus}"], cuda=True))
    assert any("rollout.engine=trtllm needs CUDA GPUs" in p for p in problems(trtllm + ["rollout.gpus=2"]))
    assert any("rollout.expert_parallel=2 must divide rollout.tensor_parallel=2 and the number of experts" in p
               for p in problems(trtllm + ["rollout.gpus=2", "rollout.expert_parallel=2"], cuda=True))
    assert any("reward.ray_gpus_per_actor=1.0 with separate TensorRT-LLM engines" in p for p in problems(
        trtllm + ["rollout.gpus=2", "reward.backend=ray", "reward.ray_gpus_per_actor=1"], cuda=True))
    assert any("rollout.gpus=2 is for rollout.engine=trtllm with rollout.placement=separate" in p
               for p in problems(["rollout.engine=trtllm", "rollout.gpus=2"], cuda=True))
    assert any("rollout.gpus=1 is for rollout.engine=trtllm" in p for p in problems(STALE_1 + ["rollout.gpus=1"]))
    assert any("reward.overlap_chunks=2 with rollout.placement=separate" in p
               for p in problems(STALE_1 + ["reward.overlap_chunks=2"]))
    assert any("trainer.debug_skip_refit_steps needs rollout.placement=separate" in p
               for p in problems(["trainer.debug_skip_refit_steps=[2]"]))


@pytest.mark.slow
def test_cli_refuses_staleness_without_the_worker_with_exit_2(tmp_path):
    output = run(["grpo.max_staleness=1", f"trainer.output_dir={tmp_path}"], timeout=300, expect=2)
    assert "grpo.max_staleness=1 needs rollout.placement=separate" in output


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_staleness_0_on_the_worker_trains_exactly_the_colocated_run(tmp_path):
    """Same seeds: the worker's copy samples the same tokens with the same engine logprobs, so the
    weights end bit-identical. Negative control: staleness 1 on the same seeds ends elsewhere."""
    args = SHORT + ["trainer.steps=3"]
    run(args + [f"trainer.output_dir={tmp_path / 'colocated'}"])
    run(args + SEPARATE + [f"trainer.output_dir={tmp_path / 'separate'}"])
    run(args + STALE_1 + [f"trainer.output_dir={tmp_path / 'stale'}"])
    colocated, separate = records(tmp_path / "colocated"), records(tmp_path / "separate")
    for step in (1, 2, 3):
        for key in ("reward/mean", "loss", "kl", "grad_norm", "token_mult_prob_error"):
            assert separate[step][key] == colocated[step][key], (step, key)
        assert separate[step]["async/policy_version"] == step - 1 and separate[step]["async/staleness"] == 0
    digest = summary(tmp_path / "colocated")["param_sha256"]
    assert summary(tmp_path / "separate")["param_sha256"] == digest
    assert summary(tmp_path / "stale")["param_sha256"] != digest


@pytest.mark.slow
def test_two_data_parallel_ranks_at_staleness_0_train_exactly_the_colocated_run(tmp_path):
    """Rank 0 serves both ranks from the one worker, each rank's rows with its own seeds: the same
    batches as each rank's colocated engine, so the weights end bit-identical."""
    args = SHORT + ["trainer.steps=2"]
    run(args + [f"trainer.output_dir={tmp_path / 'colocated'}"], nprocs=2)
    run(args + SEPARATE + [f"trainer.output_dir={tmp_path / 'separate'}"], nprocs=2)
    colocated, separate = records(tmp_path / "colocated"), records(tmp_path / "separate")
    for step in (1, 2):
        for key in ("reward/mean", "loss", "grad_norm", "token_mult_prob_error"):
            assert separate[step][key] == colocated[step][key], (step, key)
        assert separate[step]["async/staleness"] == 0
    assert summary(tmp_path / "separate")["param_sha256"] == summary(tmp_path / "colocated")["param_sha256"]


@pytest.mark.slow
def test_a_tensor_parallel_trainer_refits_the_worker_with_its_peer_streaming(tmp_path):
    """TP=2 on 2 ranks (one data-parallel rank): rank 0 sends, rank 1 takes part in the stream's
    gathers. At staleness 0 every step samples on the trainer's current weights: the worker's
    logprobs are the trainer's own (token_mult_prob_error = exp(mean |engine - trainer| logprob)
    within 1e-3 of 1; the worker's one-rank model sums in another order than TP=2, so not bit for
    bit; a worker left on its initial weights is off by far more, checked by hand)."""
    run_dir = tmp_path / "tp2"
    run(SHORT + SEPARATE + ["trainer.steps=3", "parallel.tensor_parallel=2", f"trainer.output_dir={run_dir}"], nprocs=2)
    logged = records(run_dir)
    for step in (1, 2, 3):
        assert logged[step]["async/policy_version"] == step - 1 and logged[step]["async/staleness"] == 0
        assert 1.0 <= logged[step]["token_mult_prob_error"] < 1.001, (step, logged[step])
    assert logged[3]["refit/buckets"] >= 1


@pytest.mark.slow
def test_staleness_1_trains_on_the_previous_version_and_drops_older_rollouts(tmp_path):
    """Step t (1-based; the trainer holds version t-1) trains on rollouts of version t-2 once the
    queue is full (step 1 has no older version). No refit after step 2: step 4's queued rollouts
    were sampled by version 1, two behind version 3, so they are dropped, counted and regenerated
    on version 3; step 5's (queued after the refit of step 3) are one behind again."""
    run_dir = tmp_path / "run"
    run(SHORT + STALE_1 + ["trainer.steps=5", "trainer.debug_skip_refit_steps=[2]", f"trainer.output_dir={run_dir}"])
    logged = records(run_dir)
    versions = {step: logged[step]["async/policy_version"] for step in logged}
    assert versions == {1: 0, 2: 0, 3: 1, 4: 3, 5: 3}
    rows = 4 * 4  # prompts_per_step x num_generations
    assert [logged[s]["async/dropped_rows"] for s in range(1, 6)] == [0, 0, 0, rows, 0]
    assert logged[5]["async/dropped_total"] == rows
    histogram = {v: sum(r[f"async/staleness_{v}"] for r in logged.values()) for v in (0, 1)}
    assert histogram == {0: 2 * rows, 1: 3 * rows}
    for r in logged.values():
        assert r["async/trainer_idle_s"] >= 0 and r["async/generation_idle_s"] >= 0 and r["time/generate"] > 0
        assert "tis/weight_mean" in r  # the off-policy correction ran
    assert "refit/seconds" not in logged[2] and "refit/seconds" in logged[3]  # the skipped refit
    assert logged[3]["refit/buckets"] >= 1 and logged[3]["async/refit_wait_s"] >= 0  # a broadcast (rollout_worker.py)


@pytest.mark.slow
def test_sigterm_then_resume_auto_ends_with_a_verified_checkpoint(tmp_path):
    """SIGTERM to the trainer's whole session (Ray's processes and the worker's included, as Slurm
    signals a task) while step 3 stalls at its start, before it takes its rollouts: the step
    generates on the trainer's module and finishes, a checkpoint is saved, exit 75. `--resume auto` regenerates the in-flight rollouts on
    the resumed weights and runs to the end."""
    run_dir = tmp_path / "run"
    args = SHORT + STALE_1 + ["pretrain.steps=0", "trainer.steps=6", f"trainer.output_dir={run_dir}"]
    stall = ["trainer.debug_stall_step=3", "trainer.debug_stall_s=3"]
    procs = start_cli("train", "rlsr_tiny.yaml", args + stall, tmp_path, nprocs=1, tag="first")
    wait_for_step(run_dir, 2, procs)
    time.sleep(0.8)
    os.killpg(procs[0].pid, signal.SIGTERM)
    codes = wait_all(procs, timeout=120, expect=PREEMPTED_EXIT_CODE)
    assert codes == [PREEMPTED_EXIT_CODE], f"{codes}\n{logs(tmp_path, 'first')}"
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert saved == "step_0000003" and verify_checkpoint(run_dir / "checkpoints" / saved) == []
    stopped = 3
    # after the signal the step generated on the trainer's own module, not through Ray (async_rollouts.py)
    assert records(run_dir)[3]["async/local_fallback"] == 1 and records(run_dir)[3]["async/staleness"] == 0

    started = time.monotonic()
    output = run(args + ["--resume", "auto"], timeout=300)
    assert f"resumed from {run_dir / 'checkpoints' / saved}" in output, output[-3000:]
    logged = records(run_dir)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged[stopped + 1]["async/staleness"] == 0  # the first step after a resume: regenerated, on-policy
    assert all(logged[s]["async/staleness"] == 1 for s in range(stopped + 2, 7))
    assert verify_checkpoint(run_dir / "checkpoints" / "step_0000006") == []
    print(f"resume to the end: {time.monotonic() - started:.0f}s")


@pytest.mark.slow
def test_demo_still_learns_at_staleness_1(tmp_path):
    """The demo config with the rollouts one version behind: the reward still rises by >= 0.1."""
    run(STALE_1 + [f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false", "trainer.heldout_eval=false"],
        timeout=1800)
    result = summary(tmp_path)
    assert result["reward_last10"] >= result["reward_first10"] + 0.1, result


@pytest.mark.slow
def test_async_bench_prints_steps_per_s_against_the_sequential_loop():
    result = run_python(["benchmarks/async_bench.py", "--steps", "3", "--pretrain-steps", "5",
                         "--set", "grpo.prompts_per_step=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {f["variant"]: f for f in map(fields, result.stdout.splitlines()) if "variant" in f}
    assert set(lines) == {"sync", "sync_2threads", "async_s0", "async_s1"}
    assert lines["sync"]["ratio_vs_sync"] == "1.00"
    assert all(float(f["steps_per_s"]) > 0 for f in lines.values())
    assert float(lines["async_s1"]["refit_s"]) > 0 and float(lines["sync"]["refit_s"]) == 0
    assert "predicted_s1_step_s=" in result.stdout


def fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)
