"""`nemo-rlsr sft` and `nemo-rlsr train` on user datasets (the TULU / Infinity fixtures), on CPU.

Word tokenizer built from the data, and a real HF tokenizer directory with a ChatML template; SFT
with sequence packing; SFT -> RLSR with the HF tokenizer. Short runs: they check the wiring (data
report logged, loss falls, checkpoints carry the tokenizer), not model quality.
"""

import json
from pathlib import Path

import pytest

from cli_runner import REPO, cli
from hf_tokenizers import build_hf_tokenizer

FIXTURES = REPO / "tests" / "fixtures" / "data"
DATA = ["data.max_row_bytes=4096", "data.max_prompt_tokens=32", "data.max_reference_tokens=20",
        "model.max_sequence_length=64", "trainer.progress_bar=false"]
RLSR = ["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8", "rollout.max_new_tokens=12",
        "trainer.steps=2", "trainer.heldout_eval=false"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_on_tulu_with_packing_lowers_loss(tmp_path):
    run = tmp_path / "sft"
    out = cli("sft", "sft_user_data_tiny.yaml", ["trainer.progress_bar=false", f"trainer.output_dir={run}"])
    assert "data tests/fixtures/data/tulu.jsonl: 23 rows read, 8 kept, 15 dropped" in out
    assert "dropped 1 rows: invalid_utf8" in out and "dropped 1 rows: duplicate_prompt" in out
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    # 4 examples of 15-40 tokens per step fit 2 packed rows of 64 (unpacked: 4 rows).
    assert all(r["rows"] == 2.0 for r in records), [r["rows"] for r in records]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss_last"] < summary["loss_first"] - 1.0, summary


@pytest.mark.slow
def test_rlsr_on_infinity_with_word_tokenizer(tmp_path):
    run = tmp_path / "rlsr"
    out = cli("train", "rlsr_tiny.yaml", DATA + RLSR + [
        f"data.path={FIXTURES / 'infinity.jsonl'}", "data.format=infinity", "pretrain.steps=3",
        "pretrain.batch_size=8", f"trainer.output_dir={run}"])
    assert f"data {FIXTURES / 'infinity.jsonl'}: 23 rows read, 8 kept, 15 dropped" in out
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert all(-1.0 <= r["reward/mean"] <= 1.0 for r in records)


@pytest.mark.slow
def test_sft_then_rlsr_with_hf_chat_template_tokenizer(tmp_path):
    tokenizer = build_hf_tokenizer(tmp_path / "tokenizer", "chatml")
    data = DATA + [f"data.path={FIXTURES / 'tulu.jsonl'}", "data.format=tulu", f"data.tokenizer_path={tokenizer}"]
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rlsr"
    cli("sft", "sft_tiny.yaml", data + ["sft.global_batch_size=4", "sft.micro_batch_size=4", "sft.steps=4",
                                        f"trainer.output_dir={sft_dir}"])
    summary = json.loads((sft_dir / "summary.json").read_text())
    assert summary["loss_last"] < summary["loss_first"], summary
    out = cli("train", "rlsr_from_sft_tiny.yaml", data + RLSR + [
        f"pretrain.init_checkpoint={sft_dir / 'checkpoints'}", f"trainer.output_dir={rl_dir}"])
    assert f"weights sha256 {summary['param_sha256']}" in out
    records = metrics(rl_dir)
    assert [r["step"] for r in records] == [1, 2] and abs(records[0]["kl"]) < 1e-7
    # The checkpoint records which tokenizer its weights mean: the word tokenizer of the same rows is refused.
    with pytest.raises(AssertionError, match="the checkpoint's tokenizer differs from this run's data"):
        cli("train", "rlsr_from_sft_tiny.yaml", DATA + RLSR + [
            f"data.path={FIXTURES / 'tulu.jsonl'}", "data.format=tulu",
            f"pretrain.init_checkpoint={sft_dir / 'checkpoints'}", f"trainer.output_dir={tmp_path / 'word'}"])
