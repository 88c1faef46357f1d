"""`nemo-rlsr report`, `export-hf` and `eval` on the artifacts of one real tiny training run."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nemo_rlsr.eval.formats import (ALPACA_EVAL_FIELDS, ARENA_HARD_FIELDS, alpaca_eval_outputs,
                                    arena_hard_answers)
from cli_runner import run_cli
from test_rlsr_run import TINY, run

# Field lists as the projects document them (see nemo_rlsr/eval/formats.py for the sources).
ALPACA_DOCUMENTED = {"instruction", "output", "generator", "dataset"}
ARENA_DOCUMENTED = {"question_id", "answer_id", "model_id", "choices", "tstamp"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run(TINY + ["trainer.steps=3", f"trainer.output_dir={run_dir}"])
    return run_dir


def test_answer_file_schemas_match_the_documented_fields():
    alpaca = alpaca_eval_outputs(["q1", "q2"], ["a1", "a2"], "tiny", "heldout")
    assert all(set(a) == ALPACA_DOCUMENTED for a in alpaca) and set(ALPACA_EVAL_FIELDS) == ALPACA_DOCUMENTED
    assert alpaca[1] == {"instruction": "q2", "output": "a2", "generator": "tiny", "dataset": "heldout"}
    arena = arena_hard_answers(["7", "8"], ["a1", "a2"], [3, 4], "tiny")
    assert all(set(a) == ARENA_DOCUMENTED for a in arena) and set(ARENA_HARD_FIELDS) == ARENA_DOCUMENTED
    assert arena[0]["choices"] == [{"index": 0, "turns": [{"content": "a1", "token_len": 3}]}]
    assert arena[0]["answer_id"] != arena[1]["answer_id"] and isinstance(arena[0]["tstamp"], float)


@pytest.mark.slow
def test_every_logged_metric_is_a_finite_number(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"time/generate", "time/reward", "time/advantages", "time/logprobs", "time/train"} <= set(records[0])
    assert records[0]["perf/tokens_per_s_per_rank"] > 0 and records[0]["perf/tflops_per_rank"] > 0
    for record in records:
        for key, value in record.items():
            if key.startswith("sample/"):
                assert isinstance(value, str), key
            else:
                assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


@pytest.mark.slow
def test_report_writes_nonblank_pngs(tiny_run, tmp_path):
    printed = run_cli("report", str(tiny_run), "--out", str(tmp_path))
    names = {"reward.png", "kl.png", "length.png", "entropy_clip.png", "time.png"}
    assert {p.name for p in tmp_path.glob("*.png")} == names and all(n in printed for n in names)
    for name in names:
        pixels = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.float32)
        assert pixels.shape == (400, 700, 3), name
        assert pixels.std() > 0, name
        drawn = (pixels < 250).any(axis=2).mean()  # neither blank background nor a solid fill
        assert 0.02 < drawn < 0.9, (name, drawn)


@pytest.mark.slow
def test_export_hf_folder_loads_in_transformers_with_our_logits(tiny_run, tmp_path, single_rank):
    from transformers import LlamaForCausalLM

    from nemo_rlsr.data.tokenizer import WordTokenizer
    from nemo_rlsr.eval.run import load_policy
    from nemo_rlsr.models.policy import attention_mask

    checkpoint = tiny_run / "checkpoints" / "step_0000003"
    printed = run_cli("export-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path))
    assert f"lm_eval --model hf --model_args pretrained={tmp_path}" in printed
    assert (tmp_path / "model.safetensors").exists()
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    vocab = WordTokenizer.load(tmp_path / "word_vocab.json")
    assert hf.config.vocab_size == vocab.vocab_size and hf.config.rms_norm_eps == 1e-5
    ours = load_policy(checkpoint)  # single_rank: the process group exists, no MASTER_* leak
    assert ours.tokenizer == vocab
    ids = torch.randint(0, vocab.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.module(ids, torch.arange(11).expand_as(ids), attention_mask(torch.ones_like(ids).bool()))
        torch.testing.assert_close(hf(input_ids=ids).logits, expected[..., :vocab.vocab_size], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_eval_writes_alpaca_and_arena_files_for_the_heldout_prompts(tiny_run, tmp_path):
    checkpoint = tiny_run / "checkpoints" / "step_0000003"
    printed = run_cli("eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--max-new-tokens", "8")
    assert "lm_eval --model hf" in printed
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["num_prompts"] == 24 and -1.0 <= summary["mean_similarity_to_reference"] <= 1.0
    alpaca = json.loads((tmp_path / "model_outputs.json").read_text())
    assert len(alpaca) == 24 and all(set(a) == ALPACA_DOCUMENTED for a in alpaca)
    assert alpaca[0]["instruction"].startswith("explain what") and alpaca[0]["generator"] == "step_0000003"
    arena = [json.loads(line) for line in (tmp_path / "arena_hard_answers.jsonl").read_text().splitlines()]
    assert len(arena) == 24 and all(set(a) == ARENA_DOCUMENTED for a in arena)
    assert [a["choices"][0]["turns"][0]["content"] for a in arena] == [a["output"] for a in alpaca]
    assert all(0 < a["choices"][0]["turns"][0]["token_len"] <= 8 for a in arena)
