"""Refit stream: bucketed HF-named tensors reproduce our megatron logits in transformers' Llama."""

from pathlib import Path

import pytest
import torch

from distributed_helpers import random_tiny_gpt
from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf import adapter_for_model
from nemo_rlsr.models.policy import attention_mask
from nemo_rlsr.weight_sync.buckets import iter_buckets, refit, tensor_bytes
from nemo_rlsr.weight_sync.source import hf_named_tensors

VOCAB = 61  # megatron pads it to 128: the stream must trim
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                  max_sequence_length=32, rotary_base=500)


@pytest.fixture(scope="module")
def model(single_rank):
    return random_tiny_gpt(CFG, VOCAB)


def hf_llama(state):
    return hf_llama_for(CFG, VOCAB, state)


def hf_llama_for(cfg: ModelConfig, vocab: int, state: dict):
    """transformers' Llama of `cfg` holding the HF tensors `state` (every one used, lm_head tied or given)."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_rlsr.models.hf import adapter_for

    exported = adapter_for("llama").hf_config(dataclasses.replace(cfg, vocab_size=vocab))
    hf = LlamaForCausalLM(LlamaConfig(**exported)).float().eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def test_bucketed_refit_reproduces_megatron_logits_in_hf_llama(model):
    bucket_bytes = 20_000  # norms share buckets; gate/up projections (24.6 KB each) go alone
    received, sizes = {}, []

    def push(bucket):
        sizes.append((len(bucket), sum(tensor_bytes(t) for _, t in bucket)))
        for name, tensor in bucket:
            assert name not in received
            received[name] = tensor.clone()

    metrics = refit(hf_named_tensors(model, adapter_for_model(CFG), CFG, VOCAB), bucket_bytes, push)
    assert metrics["refit/buckets"] == len(sizes) > 2
    assert all(nbytes <= bucket_bytes or count == 1 for count, nbytes in sizes)
    assert any(nbytes > bucket_bytes for _, nbytes in sizes) and any(count > 1 for count, _ in sizes)
    assert metrics["refit/gib"] * 2**30 == pytest.approx(sum(n for _, n in sizes))
    assert received["model.embed_tokens.weight"].shape == (VOCAB, 64)

    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ours = model(ids, positions, attention_mask(torch.ones_like(ids, dtype=torch.bool)))[..., :VOCAB]
        theirs = hf_llama(received)(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_iter_buckets_packs_greedily_and_isolates_oversized_tensors():
    sizes = [3, 3, 5, 20, 1, 2, 9]  # float32 elements -> 4 bytes each; bucket: 40 bytes (10 elements)
    stream = ((f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes))
    buckets = [[name for name, _ in bucket] for bucket in iter_buckets(stream, 40)]
    assert buckets == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    with pytest.raises(ValueError):
        next(iter_buckets(iter([]), 0))


def test_iter_buckets_holds_one_bucket_at_a_time():
    produced = []

    def stream():
        for i in range(6):
            produced.append(i)
            yield f"t{i}", torch.zeros(4)

    buckets = iter_buckets(stream(), 32)  # two 16-byte tensors per bucket
    assert [n for n, _ in next(buckets)] == ["t0", "t1"]
    assert produced == [0, 1, 2]  # the third tensor was read to close the first bucket, no more


WORKER = Path(__file__).parent / "weight_sync_worker.py"


@pytest.mark.slow
def test_tp2_gathered_stream_equals_tp1(tmp_path):
    from distributed_helpers import run_workers

    for rank in run_workers("refit_tp", tmp_path, nprocs=2, worker=WORKER):
        assert list(rank["tp1"]) == list(rank["tp2"])  # same names, same order, on both TP ranks
        for name, tensor in rank["tp1"].items():
            assert torch.equal(rank["tp2"][name], tensor), name


@pytest.mark.slow
def test_pp2_stream_gives_every_rank_every_stage(tmp_path):
    from distributed_helpers import run_workers

    for rank in run_workers("refit_pp", tmp_path, nprocs=2, worker=WORKER):
        assert set(rank["tp1"]) == set(rank["pp2"])
        for name, tensor in rank["tp1"].items():
            assert torch.equal(rank["pp2"][name], tensor), name
