"""Every shipped recipe passes the trainer's own start-up checks on a GPU node of its cluster, and
`nemo-rlsr plan` runs those same checks.

The machine is our image on the recipe's GPUs (`Machine.container`: the image's Transformer
Engine, sm90, CUDA and TensorRT-LLM present) at the recipe's world size (cluster.nodes x
gpus_per_node); the checks are `trainer.startup.startup_problems`, which both trainers raise at
start-up and `plan` reports. Also: the paper recipes' length filters drop a too-long row and count
it instead of stopping the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_runner import cli
from nemo_rlsr.config import ConfigError, load_config
from nemo_rlsr.planner import make_plan
from nemo_rlsr.planner.hardware import device
from nemo_rlsr.trainer.startup import CONTAINER_CUDA_VERSION, CONTAINER_TE_VERSION, Machine, startup_problems

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in REPO.glob("conf/*.yaml") if p.name.startswith(("rlsr_", "sft_")))
PAPER = [p for p in RECIPES if "tiny" not in p.name]


def mode_of(path: Path) -> str:
    return "sft" if path.name.startswith("sft_") else "rlsr"


def cluster_machine(cfg) -> Machine:
    return Machine.container(cfg.cluster.nodes * cfg.cluster.gpus_per_node, device(cfg.cluster.gpu).compute_capability)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_passes_the_trainers_startup_checks_on_its_cluster(path):
    cfg = load_config(path)
    machine = cluster_machine(cfg)
    if path in PAPER:
        assert machine == Machine(cfg.cluster.nodes * 8, CONTAINER_TE_VERSION, (9, 0), cuda=True, trtllm=True,
                                 cuda_version=CONTAINER_CUDA_VERSION)
    assert startup_problems(cfg, machine, mode_of(path)) == []


def test_plan_reports_the_startup_problems_and_exits_nonzero(capsys):
    """An engine layout the trainer cannot build (rollout.tensor_parallel=3 at TP 8: neither a divisor
    nor a multiple) is refused by engine_problems, so must it be by `plan` (the trainer would die
    after the container, Ray and the data had loaded)."""
    from nemo_rlsr.cli import main

    recipe = REPO / "conf/rlsr_qwen32b_sb.yaml"
    cfg = load_config(recipe, ["rollout.tensor_parallel=3"])
    plan = make_plan(cfg)
    assert plan.problems == startup_problems(cfg, cluster_machine(cfg), "rlsr") != []
    assert any("must divide or be a multiple of the trainer's" in p for p in plan.problems)
    assert main(["plan", "--config", str(recipe), "rollout.tensor_parallel=3"]) == 1
    assert "tensor_parallel x pipeline_parallel = 8" in capsys.readouterr().out
    # the machine is part of the check: a TensorRT-LLM recipe planned for a machine without GPUs
    assert any("needs CUDA GPUs" in p for p in make_plan(load_config(recipe), gpu="cpu").problems)
    assert main(["plan", "--config", str(recipe)]) == 0


def test_planner_sizes_engines_as_the_trainer_builds_them():
    """rollout.tensor_parallel=null: a TensorRT-LLM engine spans TP x PP GPUs (generation.factory.engine_gpus)."""
    cfg = load_config(REPO / "conf/rlsr_moe_1t.yaml", ["rollout.tensor_parallel=null"])
    plan = make_plan(cfg)
    assert (plan.layout.engine_tp, plan.layout.engines) == (64, 8) and plan.fits, plan.problems


def test_trainers_raise_every_startup_problem_at_once(tmp_path):
    """Through the trainer's own entry (`fit`), before any process group exists: the problems of
    keys that used to stop the run later with a ValueError (the guard's, the preemption handler's,
    the reward's, the sampler's, the reference placement's) are in the same list."""
    import torch.distributed as dist

    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    overrides = ["grpo.num_generations=1", "trainer.keep_last_checkpoints=-1", "optimizer.cpu_offload=true",
                 "trainer.max_consecutive_nonfinite=0", "trainer.preemption_signals=[SIGNOPE]",
                 "reward.repetition_mode=loops", "rollout.temperature=0", "grpo.reference_placement=gpu",
                 f"trainer.output_dir={tmp_path}"]
    initialized = dist.is_initialized()
    with pytest.raises(ConfigError) as err:
        RLSRTrainer(load_config(REPO / "conf/rlsr_tiny.yaml", overrides)).fit()
    for key in ("grpo.num_generations", "trainer.keep_last_checkpoints", "optimizer.cpu_offload",
                "trainer.max_consecutive_nonfinite", "trainer.preemption_signals", "reward.repetition_mode",
                "rollout.temperature", "grpo.reference_placement"):
        assert key in str(err.value), key
    assert dist.is_initialized() == initialized and not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.slow
def test_sft_cli_refuses_with_the_startup_problems():
    output = cli("sft", "sft_tiny.yaml", ["pretrain.steps=5", "trainer.keep_last_checkpoints=-1"], timeout=300, expect=2)
    assert "`pretrain.steps` must be 0" in output and "trainer.keep_last_checkpoints" in output


@pytest.mark.parametrize("overrides, mode, message", [
    (["data.max_prompt_tokens=16"], "rlsr", "not applied to data.format=instructions"),
    (["data.format=tulu", "data.path=x.jsonl", "data.max_prompt_tokens=40", "trainer.heldout_eval=false"], "rlsr",
     "data.max_prompt_tokens=40 + rollout.max_new_tokens=20 exceeds model.max_sequence_length=48"),
    (["data.format=tulu", "data.path=x.jsonl", "data.max_prompt_tokens=30", "data.max_reference_tokens=18"], "sft",
     "+ eos exceeds model.max_sequence_length=48"),
])
def test_length_filters_that_cannot_protect_the_trainer_are_refused(overrides, mode, message):
    config = REPO / ("conf/sft_tiny.yaml" if mode == "sft" else "conf/rlsr_tiny.yaml")  # 48-token sequences
    problems = startup_problems(load_config(config, overrides), Machine.container(1, None), mode)
    assert len(problems) == 1 and message in problems[0], problems
    fits = ["data.format=tulu", "data.path=x.jsonl", "data.max_prompt_tokens=28", "data.max_reference_tokens=19",
            "trainer.heldout_eval=false"]
    assert startup_problems(load_config(config, fits), Machine.container(1, None), mode) == []


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_recipes_filter_rows_by_length(path):
    d = load_config(path).data
    assert d.format != "instructions" and d.max_prompt_tokens is not None and d.max_reference_tokens is not None


def test_a_too_long_row_of_a_paper_recipe_is_dropped_and_counted(tmp_path):
    """The paper recipe's data settings on a file with one prompt longer than 4096 - 2048 tokens: it
    is dropped and counted, and the trainer's own prompt check then accepts the rest; with the
    filter off (as the recipes shipped) the same file stops the trainer."""
    from hf_tokenizers import build_hf_tokenizer
    from nemo_rlsr.data.dataset import PROMPT_TOO_LONG, load_training_data
    from nemo_rlsr.data.instructions import DatasetError
    from nemo_rlsr.trainer.rlsr import rollout_prompts

    def row(prompt: str, answer: str) -> str:
        return json.dumps({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([row("what is a lemon ?", "a fruit ."), row("lemon " * 2100, "yes ."),
                               row("what is a drum ?", "an instrument .")]) + "\n")
    tokenizer = build_hf_tokenizer(tmp_path / "tokenizer", "chatml")
    recipe = REPO / "conf/rlsr_qwen7b_sb.yaml"
    cfg = load_config(recipe, [f"data.path={data}", f"data.tokenizer_path={tokenizer}"])
    loaded = load_training_data(cfg.data, log=lambda line: None)
    assert (loaded.report.rows_in, loaded.report.rows_kept, dict(loaded.report.dropped)) == (3, 2, {PROMPT_TOO_LONG: 1})
    prompts = rollout_prompts(loaded.train, cfg)
    assert len(prompts) == 2

    unfiltered = load_config(recipe, [f"data.path={data}", f"data.tokenizer_path={tokenizer}",
                                      "data.max_prompt_tokens=null"])
    loaded = load_training_data(unfiltered.data, log=lambda line: None)
    assert loaded.report.rows_kept == 3
    with pytest.raises(DatasetError, match="exceeds model.max_sequence_length=4096"):
        rollout_prompts(loaded.train, unfiltered)
