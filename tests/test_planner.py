"""The planner: parameter counts, the recipes in conf/, refusals with reasons, the CLI, the docs table."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_runner import run_python
from nemo_rlsr.cli import main as cli_main
from nemo_rlsr.config import ConfigError, load_config
from nemo_rlsr.config.rules import unsupported_problems
from nemo_rlsr.planner import make_plan, write_launch_env
from nemo_rlsr.planner.shapes import ModelShape
from nemo_rlsr.planner.timing import overlapped_step_seconds, plan_time

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in REPO.glob("conf/*.yaml") if p.name.startswith(("rlsr_", "sft_")) and "tiny" not in p.name)


def mode_of(path: Path) -> str:
    return "sft" if path.name.startswith("sft_") else "rlsr"


def test_every_config_file_parses():
    files = sorted(REPO.glob("conf/**/*.yaml"))
    assert {p.parent.name for p in files} == {"conf", "models", "encoders"}
    for path in files:
        load_config(path)


def test_tiny_parameter_count_equals_megatron_model(single_rank):
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.planner.plan import vocab_size

    cfg = load_config(REPO / "conf/rlsr_tiny.yaml")
    model = build_gpt(cfg.model, vocab_size(cfg))
    plan = make_plan(cfg)
    assert plan.shape.total_params() == sum(p.numel() for p in model.parameters())


def test_planner_pads_the_vocabulary_like_the_policy_and_does_not_import_torch():
    from nemo_rlsr.models.gpt import padded_vocab_size
    from nemo_rlsr.planner.shapes import padded_vocab_size as planner_padding

    for vocab in (1, 255, 256, 257, 128256, 151665, 152064, 163840):
        assert planner_padding(vocab) == padded_vocab_size(vocab, 1) == padded_vocab_size(vocab, 8)
    code = "import sys, nemo_rlsr.cli; nemo_rlsr.cli.main(['plan', '--config', 'conf/rlsr_tiny.yaml']); print('torch' in sys.modules)"
    out = run_python(["-c", code]).stdout
    assert out.strip().endswith("False")


@pytest.mark.parametrize("fragment, overrides, published", [
    ("qwen2.5-7b", [], 7.61e9),  # Qwen2.5-7B model card
    ("llama3.1-8b", [], 8.03e9),  # Llama-3.1-8B model card
    ("qwen2.5-32b", [], 32.5e9),  # Qwen2.5-32B model card
    # The Kimi-K2 shape with DeepSeek-V3's heads, experts, dense layers and vocabulary: 671B.
    ("kimi-k2-1t", ["model.num_attention_heads=128", "model.num_moe_experts=256",
                    "model.moe_first_dense_layers=3", "model.vocab_size=129280"], 671e9),
])
def test_parameter_counts_match_published_sizes(fragment, overrides, published):
    cfg = load_config(REPO / f"conf/models/{fragment}.yaml", overrides)
    total = ModelShape.build(cfg.model, cfg.model.vocab_size).total_params()
    assert abs(total - published) / published < 0.01, total


def test_moe_recipe_is_a_trillion_parameters_with_32b_active():
    cfg = load_config(REPO / "conf/rlsr_moe_1t.yaml")
    shape = ModelShape.build(cfg.model, cfg.model.vocab_size)
    assert 1.0e12 < shape.total_params() < 1.1e12
    assert 30e9 < shape.active_params() < 34e9  # Kimi-K2: 32B activated


@pytest.mark.parametrize("path", RECIPES + [REPO / "conf/rlsr_tiny.yaml"], ids=lambda p: p.name)
def test_every_recipe_fits_its_own_cluster(path):
    cfg = load_config(path)
    plan = make_plan(cfg, mode=mode_of(path))
    assert plan.fits, plan.problems
    assert plan.layout.world == cfg.cluster.nodes * cfg.cluster.gpus_per_node
    assert plan.time.total > 0 and plan.memory.peak <= plan.memory.usable
    if "tiny" not in path.name:
        assert cfg.cluster.gpu in ("h100-80gb", "h200-141gb") and cfg.cluster.gpus_per_node == 8


def test_recipes_follow_the_paper():
    rlsr = [p for p in RECIPES if mode_of(p) == "rlsr"]
    names = {p.stem for p in rlsr}
    for model in ("qwen7b", "llama8b", "qwen32b"):
        assert {f"rlsr_{model}_sb", f"rlsr_{model}_qwenem"} <= names
    for path in rlsr:
        cfg = load_config(path)
        g = cfg.grpo
        assert (g.num_generations, g.prompts_per_step, g.kl_coef) == (8, 1024, 0.001)
        assert g.prompts_per_step // g.mini_batches_per_step == 256  # PPO mini-batch of 256 prompts
        assert cfg.model.max_sequence_length == 4096
        assert 1e-6 <= cfg.optimizer.lr <= 3e-6
        assert cfg.reward.encoder in ("minilm-l6", "qwen3-embedding-8b")
    for path in RECIPES:
        if mode_of(path) == "sft":
            assert load_config(path).optimizer.lr == 3e-5


def test_a_layout_that_does_not_fit_is_refused_with_the_reason():
    cfg = load_config(REPO / "conf/rlsr_qwen32b_sb.yaml")  # TP 8: one node is one model replica
    plan = make_plan(cfg, nodes=1)
    assert not plan.fits
    (reason,) = plan.problems
    assert "phase needs" in reason and "h100-80gb leaves 70.5 GiB" in reason and "optimizer" in reason
    # The same layout on one H200 node fits: the refusal is about memory, not the layout.
    assert make_plan(cfg, nodes=1, gpu="h200-141gb").fits


def test_megatron_divisibility_rules_are_refused_by_name():
    cfg = load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", ["parallel.tensor_parallel=8"])
    problems = make_plan(cfg).problems
    assert any("num_attention_heads=28" in p for p in problems)
    assert any("num_query_groups=4" in p for p in problems)
    uneven = load_config(REPO / "conf/rlsr_moe_1t.yaml", ["parallel.num_layers_in_last_pipeline_stage=5"])
    assert any("does not split into pipeline stages" in p for p in make_plan(uneven).problems)
    assert any("grpo.prompts_per_step=1024 is not divisible by DP=24" in p
               for p in make_plan(load_config(REPO / "conf/rlsr_qwen7b_sb.yaml"), nodes=6).problems)


def test_planner_knows_every_encoder_the_reward_can_load():
    from nemo_rlsr.config.rules import ENCODER_FAMILIES
    from nemo_rlsr.planner.shapes import ENCODERS

    assert set(ENCODER_FAMILIES) <= set(ENCODERS)


def test_plan_cli_exit_codes_and_launch_env(tmp_path, capsys):
    env_file = tmp_path / "launch.env"
    assert cli_main(["plan", "--config", str(REPO / "conf/rlsr_qwen7b_sb.yaml"), "--launch-env", str(env_file)]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "rollout KV cache" in out and "generation" in out
    assert "NEMO_RLSR_NEEDS_RAY='1'" in env_file.read_text()
    assert cli_main(["plan", "--config", str(REPO / "conf/rlsr_qwen32b_sb.yaml"), "--nodes", "1"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert cli_main(["plan", "--config", str(REPO / "conf/rlsr_tiny.yaml"), "--gpu", "a100"]) == 2


def test_separate_engines_take_whole_nodes_beside_the_trainer(tmp_path):
    """rollout.engine=trtllm, rollout.placement=separate: the plan gives the engines the last
    rollout.gpus / gpus-per-node nodes (slurm/launch.sh reads how many), the trainer the others; an
    engine GPU holds only the engine's weights and KV cache."""
    separate = ["rollout.placement=separate", "rollout.gpus=8", "rollout.tensor_parallel=2", "grpo.max_staleness=1",
                "grpo.tis_cap=2.0", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false"]
    cfg = load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", separate)
    plan = make_plan(cfg, nodes=3, gpus_per_node=8, gpu="h200-141gb")
    assert plan.fits, plan.problems
    assert plan.engine_nodes == 1 and plan.layout.world == 16 and plan.layout.dp == 16 and plan.layout.engines == 4
    m = plan.memory
    assert m.phases["generation"] == m.items["rollout engine weights"] + m.items["rollout KV cache"]
    assert m.phases["training"] > m.items["weights"] + m.items["grads"]  # the trainer's, without the engine
    assert plan.time.overlapped
    colocated = make_plan(load_config(REPO / "conf/rlsr_qwen7b_sb.yaml",
                                      ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
                                       "rollout.tensor_parallel=2"]), nodes=2, gpus_per_node=8, gpu="h200-141gb")
    assert colocated.layout.engines == 8 and colocated.engine_nodes == 0  # engines on the trainer's 16 GPUs
    env_file = tmp_path / "launch.env"
    write_launch_env(plan, env_file)
    assert "NEMO_RLSR_ENGINE_NODES='1'" in env_file.read_text() and "NEMO_RLSR_WORLD_SIZE='16'" in env_file.read_text()
    for nodes, gpus in ((3, 4), (1, 8)):  # part of a node; no node left for the trainer
        refused = make_plan(load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", separate + [f"rollout.gpus={gpus}"]),
                            nodes=nodes, gpus_per_node=8, gpu="h200-141gb")
        assert any(f"rollout.gpus={gpus} must be whole nodes of 8 GPUs" in p for p in refused.problems)


def test_trainer_refuses_recipe_keys_it_cannot_act_on():
    for recipe in ("rlsr_tiny", "rlsr_qwen7b_sb", "rlsr_moe_1t"):  # sequence parallel recipes included
        assert unsupported_problems(load_config(REPO / f"conf/{recipe}.yaml")) == []
    cfg = load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", ["optimizer.cpu_offload=true"])
    problems = unsupported_problems(cfg)
    assert len(problems) == 1 and "optimizer.cpu_offload" in problems[0]
    assert "cluster." not in problems[0]  # where a recipe runs is not the trainer's business
    # the trainers' one start-up check (before anything is built) raises it
    from nemo_rlsr.trainer.startup import Machine, check_startup

    with pytest.raises(ConfigError, match="optimizer.cpu_offload"):
        check_startup(cfg, Machine.container(32, (9, 0)))


@pytest.mark.slow
def test_docs_recipe_table_is_generated_from_the_planner():
    result = run_python([str(REPO / "docs/make_recipe_table.py"), "--check"])
    assert result.returncode == 0, result.stderr
    table = (REPO / "docs/recipes.md").read_text()
    assert all(f"`conf/{p.name}`" in table for p in RECIPES)


def test_async_step_time_is_the_longer_side_plus_the_refit():
    """rollout.placement=separate at grpo.max_staleness >= 1: generation beside the trainer's phases;
    at staleness 0 the phases still add up (the worker and the trainer wait for each other)."""
    assert overlapped_step_seconds({"generation": 3.0, "reward": 1.0, "training": 1.0, "refit": 0.5}) == 3.5
    assert overlapped_step_seconds({"generation": 1.0, "logprobs": 1.0, "training": 2.0, "refit": 0.5}) == 3.5
    # The torch worker's devices are not in the layout: its step time is modelled on the colocated
    # plan's layout and memory.
    path = REPO / "conf/rlsr_qwen32b_sb.yaml"
    plan = make_plan(load_config(path), nodes=1, gpu="h200-141gb")

    def step_time(overrides: list[str]):
        return plan_time(load_config(path, overrides), plan.shape, plan.layout, plan.device, plan.memory, "rlsr")

    separate = ["rollout.placement=separate", "grpo.tis_cap=2.0"]
    on_policy, stale = step_time(separate), step_time(separate + ["grpo.max_staleness=1"])
    assert plan.time.phases["refit"] < stale.phases["refit"]  # the whole model to the worker's copy, not shards
    assert not on_policy.overlapped and on_policy.total == pytest.approx(sum(on_policy.phases.values()))
    rest = sum(v for k, v in stale.phases.items() if k not in ("generation", "refit"))
    assert stale.overlapped
    assert stale.total == pytest.approx(max(stale.phases["generation"], rest) + stale.phases["refit"])
    assert stale.total < on_policy.total
