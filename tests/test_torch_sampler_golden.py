"""The torch sampler's tokens and logprobs for fixed cases, against a recording.

The recording (tests/fixtures/torch_sampler_golden.json) was made before the decode loop was split
into `DecodeState` (prefill / step / compact) and a lockstep strategy: the split was to change the
code's shape, not one sampled token. Each case drives one branch of the decode bookkeeping: rows
leaving at EOS while others go on, n samples sharing their prompt's cache (and the unshared path),
top-k/top-p, one seed per request, stop strings spanning tokens, every row stopping before
`max_new_tokens`, a single new token. (Expert-parallel lockstep: tests/test_ep_rollout.py.)

Weights come from our own seeded generator, not megatron's init, so that the recording does not
depend on how a megatron-core release initialises. It is CPU arithmetic (local spec, float32): on a
CUDA machine the model runs elsewhere, with other kernels, so the test is skipped there.

An intended change of the sampled tokens (a new sampling rule) re-records it:
`NEMO_RLSR_RECORD_GOLDEN=1 python -m pytest tests/test_torch_sampler_golden.py`; say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
from nemo_rlsr.models.policy import MegatronPolicy

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "torch_sampler_golden.json"
RECORD = os.environ.get("NEMO_RLSR_RECORD_GOLDEN") == "1"
VOCAB = 61  # not a multiple of 8: the padded vocabulary ids must never be drawn
PAD, EOS = 0, 10
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
# name -> (engine options, sampling, seed)
CASES = {
    "greedy_rows_leave_at_eos": ({}, SamplingParams(10, greedy=True), 0),
    "shared_prompt_kv_top_k_top_p": ({}, SamplingParams(10, temperature=0.9, top_k=8, top_p=0.8, n=3), 5),
    "unshared_prompt_kv_top_k_top_p": ({"share_prompt_kv": False},
                                       SamplingParams(10, temperature=0.9, top_k=8, top_p=0.8, n=3), 5),
    "seed_per_request": ({}, SamplingParams(10, temperature=0.7, n=2), [11, 12, 13, 14]),
    "stop_strings": ({"detokenize": True},
                     SamplingParams(10, stop_on_eos=False, stop=("<50><50>", "<7><7>", "<14>"), n=2), 2),
    "every_row_stops_early": ({"detokenize": True},
                              SamplingParams(10, greedy=True, stop=("<37>", "<49>", "<10>")), 0),
    "one_new_token": ({}, SamplingParams(1, n=2), 9),
}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="recorded with CPU float32 kernels")


def detokenize(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def module(single_rank):
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      max_sequence_length=32)
    policy = MegatronPolicy(cfg, None, VOCAB, single_rank)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from megatron's small init, so that tokens depend on the prompt
        for _, param in sorted(policy.module.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if param.dim() == 1 else 0.15 * noise)
    return policy.module


def outputs(module, name: str) -> dict:
    options, params, seed = CASES[name]
    engine = TorchRolloutEngine(module, PAD, EOS, VOCAB, detokenize=detokenize if options.get("detokenize") else None,
                                share_prompt_kv=options.get("share_prompt_kv", True))
    batch = engine.generate(PROMPTS, params, seed)
    return {"input_ids": batch.input_ids.tolist(), "valid": batch.valid.tolist(),
            "response_ids": batch.response_ids, "truncated": batch.truncated.tolist(),
            "logprobs": [row[mask > 0].tolist() for row, mask in zip(batch.engine_logprobs, batch.response_mask)]}


def test_recording_covers_what_it_claims():
    """Each case exercises what its name says (checked on the recording, so a re-recording that lost
    a branch fails here)."""
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(CASES)
    eos = golden["greedy_rows_leave_at_eos"]
    assert True in eos["truncated"] and False in eos["truncated"]
    assert len({len(r) for r in eos["response_ids"]}) > 1  # rows left at different steps
    assert golden["shared_prompt_kv_top_k_top_p"]["response_ids"] == golden["unshared_prompt_kv_top_k_top_p"]["response_ids"]
    stops = golden["stop_strings"]
    assert any(not t and len(r) < 10 for t, r in zip(stops["truncated"], stops["response_ids"]))
    assert not any(golden["every_row_stops_early"]["truncated"])
    assert max(len(r) for r in golden["every_row_stops_early"]["response_ids"]) < 10
    assert all(len(r) == 1 for r in golden["one_new_token"]["response_ids"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampler_reproduces_the_recording(module, name):
    got = outputs(module, name)
    if RECORD:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**golden, name: got}, indent=None, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())[name]
    for key in ("input_ids", "valid", "response_ids", "truncated"):
        assert got[key] == expected[key], key
    for row, (mine, recorded) in enumerate(zip(got["logprobs"], expected["logprobs"])):
        # exact on the machine that recorded it; the tolerance covers other CPUs' float32 kernels
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(recorded), rtol=0, atol=1e-5, msg=f"row {row}")
