"""The run skeleton both trainers share (trainer/run.py) and the run state their checkpoints carry
(trainer/state.py): nothing is built before `fit()`, one `--resume auto` behaviour for `train` and
`sft`, every component closed however the run ends, the checkpoint's `extra` keys unchanged."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nemo_rlsr.config import ConfigError, load_config, to_dict
from test_cli_exit_codes import cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.progress_bar=false", "trainer.heldout_eval=false", "pretrain.steps=0", "grpo.prompts_per_step=2",
        "grpo.num_generations=4", "grpo.micro_batch_size=8", "rollout.max_new_tokens=6"]


def test_a_trainer_builds_nothing_before_fit(tmp_path):
    from nemo_rlsr.trainer.rlsr import RLSRTrainer
    from nemo_rlsr.trainer.sft import SFTTrainer

    for trainer_class, config in ((RLSRTrainer, "rlsr_tiny.yaml"), (SFTTrainer, "sft_tiny.yaml")):
        run_dir = tmp_path / config
        trainer = trainer_class(load_config(REPO / "conf" / config, [f"trainer.output_dir={run_dir}"]))
        assert not hasattr(trainer, "policy") and not hasattr(trainer, "ctx") and not run_dir.exists()
        trainer.close()  # nothing to close yet: a no-op


def test_the_run_state_is_the_checkpoint_extra_and_loads_itself():
    """The keys are the checkpoint format every reader relies on (resume, pretrain.init_checkpoint,
    export-hf and eval read `config` and `tokenizer`); a state loads back into fresh components."""
    from nemo_rlsr.data.instructions import BUNDLED_DATASET, build_word_tokenizer, load_instructions
    from nemo_rlsr.data.sampler import PromptSampler
    from nemo_rlsr.trainer.guards import NonFiniteGuard
    from nemo_rlsr.trainer.state import RunState

    examples = load_instructions(BUNDLED_DATASET)
    tokenizer = build_word_tokenizer(examples)
    config = to_dict(load_config(REPO / "conf/rlsr_tiny.yaml"))

    def fresh(stage=None) -> RunState:
        return RunState(tokenizer, PromptSampler(len(examples), 4, 0, 1, seed=3), NonFiniteGuard(3), config,
                        stage=stage)

    state = fresh()
    for _ in range(5):
        state.sampler.next_batch()
    state.guard.observe(4, {"nonfinite": 1.0})
    state.step, state.base_heldout = 5, {"reward": 0.5, "own_answer_rate": 0.25, "examples": []}
    saved = state.state_dict()
    assert set(saved) == {"step", "sampler", "tokenizer", "config", "base_heldout", "guard"}
    assert set(fresh("sft").state_dict()) == set(saved) | {"stage"}

    restored = fresh()
    restored.load_state_dict(saved, Path("step_0000005"))
    assert restored.state_dict() == saved
    assert restored.sampler.next_batch() == state.sampler.next_batch()
    # a checkpoint written before the guard was part of the state has no count
    older = fresh()
    older.load_state_dict({k: v for k, v in saved.items() if k != "guard"}, Path("old"))
    assert older.guard.total == 0

    other = RunState(build_word_tokenizer(examples[:10]), PromptSampler(len(examples), 4, 0, 1, seed=3),
                     NonFiniteGuard(3), config)
    with pytest.raises(ConfigError, match="step_0000005: the checkpoint's tokenizer differs"):
        other.load_state_dict(saved, Path("step_0000005"))


@pytest.mark.parametrize("command, config", [("train", "rlsr_tiny.yaml"), ("sft", "sft_tiny.yaml")])
def test_resume_auto_with_only_damaged_checkpoints_names_the_problem(tmp_path, command, config):
    """`--resume auto` over checkpoints that all fail their manifest: both commands name that (SFT
    used to tell the user to pass --resume, which they had)."""
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)  # no manifest: a save that never finished
    result = cli(command, "--config", str(REPO / "conf" / config), f"trainer.output_dir={tmp_path}",
                 "trainer.progress_bar=false", "--resume", "auto")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--resume auto: every checkpoint under {tmp_path} is incomplete or corrupt" in result.stderr
    assert "pass --resume" not in result.stderr
    assert "skipping incomplete or corrupt checkpoint" in result.stderr and "step_0000002" in result.stderr


@pytest.mark.parametrize("command", ["export-hf", "eval"])
def test_export_and_eval_of_a_path_that_is_not_a_checkpoint_exit_2(tmp_path, command):
    (tmp_path / "step_0000001").mkdir()
    result = cli(command, "--checkpoint", str(tmp_path / "step_0000001"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "neither a complete checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_every_component_is_closed_when_the_run_raises(single_rank, tmp_path, monkeypatch):
    """A run stopped by its non-finite guard (NonFiniteError, the CLI's exit 3): the Ray reward pool
    it started is shut down, the rollout engine closed, the signal handlers given back."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance of another test is up: the pool would not own it")
    from nemo_rlsr.generation.interface import RolloutEngine
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
    from nemo_rlsr.models.interface import Policy
    from nemo_rlsr.rewards import RewardActor
    from nemo_rlsr.trainer.guards import NonFiniteError
    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    closed = []
    original = TorchRolloutEngine.close

    def recording_close(engine):
        closed.append(engine)
        original(engine)

    monkeypatch.setattr(TorchRolloutEngine, "close", recording_close)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    cfg = load_config(REPO / "conf/rlsr_tiny.yaml", FAST + [
        f"trainer.output_dir={tmp_path}", "trainer.steps=3", "trainer.debug_inject_nan_steps=[1]",
        "trainer.max_consecutive_nonfinite=1", "reward.backend=ray", "reward.ray_num_actors=1"])
    trainer = RLSRTrainer(cfg)
    with pytest.raises(NonFiniteError):
        trainer.fit()
    assert closed == [trainer.engine]
    assert not ray.is_initialized()
    # the trainer holds its parts by their protocols
    assert isinstance(trainer.policy, Policy) and isinstance(trainer.engine, RolloutEngine)
    assert isinstance(trainer.reward, RewardActor)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
