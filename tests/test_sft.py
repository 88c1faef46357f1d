"""`nemo-rlsr sft` (response-only loss, LR schedule, checkpoint) and the SFT -> RLSR pipeline."""

import json
import math
from pathlib import Path

import pytest

from cli_runner import cli
from nemo_rlsr.data.dataset import TrainingExample
from nemo_rlsr.data.instructions import encode_prompt
from nemo_rlsr.data.tokenizer import WordTokenizer
from nemo_rlsr.trainer.sft import lr_at, sft_batch, sft_row

REPO = Path(__file__).resolve().parents[1]
RLSR_TINY = ["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
             "rollout.max_new_tokens=12", "trainer.progress_bar=false"]


def test_loss_mask_covers_exactly_the_response_and_eos():
    tok = WordTokenizer.build(["question : what is a dog ? answer :", "a dog barks ."])
    example = TrainingExample(None, encode_prompt(tok, "what is a dog ?"), tok.encode("a dog barks ."))
    ids, prompt_len = sft_row(example, tok.eos_id)
    assert ids[:prompt_len] == encode_prompt(tok, "what is a dog ?") and ids[-1] == tok.eos_id
    batch = sft_batch([(ids, prompt_len)], len(ids) + 3, tok.pad_id)
    targets = batch.targets[0][batch.loss_mask[0].bool()].tolist()
    assert targets == tok.encode("a dog barks .") + [tok.eos_id]  # response targets only, no prompt, no pad
    assert batch.valid[0].tolist() == [True] * len(ids) + [False] * 3


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 20, 1.0, 4, 0.1) for s in range(1, 21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(lrs[-1], 0.1) and math.isclose(lr_at(12, 20, 1.0, 4, 0.1), 0.55)


@pytest.mark.slow
def test_sft_lowers_loss_then_rlsr_starts_from_it(tmp_path):
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rlsr"
    out = cli("sft", "sft_tiny.yaml", ["sft.steps=32", f"trainer.output_dir={sft_dir}", "trainer.progress_bar=false"])
    summary = json.loads((sft_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 33))
    assert summary["loss_last"] < summary["loss_first"] - 2.0, summary  # ~5.6 -> < 1
    assert summary["heldout_nll_end"] < summary["heldout_nll_start"] - 2.0, summary
    assert records[0]["lr"] < records[5]["lr"] and records[-1]["lr"] < records[10]["lr"]  # warmup, decay
    assert (sft_dir / "checkpoints" / "latest").read_text().strip() == "step_0000032", out

    out = cli("train", "rlsr_from_sft_tiny.yaml", RLSR_TINY + [
        f"pretrain.init_checkpoint={sft_dir / 'checkpoints'}", "trainer.steps=2", f"trainer.output_dir={rl_dir}"])
    # The loaded weights are the SFT run's final weights, and they are also the reference: KL = 0 at step 1.
    assert f"initialised policy and reference from {sft_dir / 'checkpoints' / 'step_0000032'}" in out
    assert f"weights sha256 {summary['param_sha256']}" in out
    rl = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [1, 2]
    assert abs(rl[0]["kl"]) < 1e-7 and rl[0]["ratio"] == 1.0
    assert (rl_dir / "base" / "latest").read_text().strip() == "step_0000000"
