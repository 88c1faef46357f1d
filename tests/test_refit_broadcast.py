"""Refit over a collective (weight_sync/broadcast.py): the bytes, the plan, and a TP=2 trainer's
stream loaded into transformers in another process, whose logits must be ours."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cli_runner import free_port, logs, start_ranks, wait_all
from nemo_rlsr.weight_sync.broadcast import (
    ALIGN, RefitGroup, bucket_bytes_of, bucket_plan, fused_group, manifest_of, pack, send_refit, unpack)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refit_broadcast_worker import stream  # noqa: E402

WORKER = Path(__file__).resolve().parent / "refit_broadcast_worker.py"


def test_pack_unpack_round_trips_every_dtype_at_aligned_offsets():
    tensors = [t for _, t in stream()]
    buffer = pack(tensors)
    manifest = manifest_of(stream())
    assert buffer.dtype == torch.uint8 and buffer.numel() == bucket_bytes_of(manifest)
    views = unpack(buffer, manifest)
    for (name, original), (got_name, got) in zip(stream(), views):
        assert got_name == name and got.dtype == original.dtype and torch.equal(got, original), name
        assert (got.data_ptr() - buffer.data_ptr()) % ALIGN == 0
    with pytest.raises(ValueError, match="bytes for entries of"):
        unpack(buffer[:-ALIGN], manifest)


def test_bucket_plan_bounds_buckets_and_never_splits_a_fused_group():
    manifest = manifest_of(stream())
    assert fused_group("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.self_attn.qkv.bias"
    assert fused_group("model.layers.3.mlp.experts.7.up_proj.weight") == "model.layers.3.mlp.experts.7.gate_up.weight"
    assert fused_group("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj.weight"
    for limit in (1, 100, 200, 400, 10**6):
        plan = bucket_plan(manifest, limit)
        assert [i for bucket in plan for i in bucket] == list(range(len(manifest)))  # all, in order
        where = {manifest[i][0]: b for b, bucket in enumerate(plan) for i in bucket}
        assert where["layers.0.self_attn.q_proj.weight"] == where["layers.0.self_attn.v_proj.weight"]
        assert where["layers.0.mlp.gate_proj.weight"] == where["layers.0.mlp.up_proj.weight"]
        groups = {fused_group(manifest[i][0]) for bucket in plan for i in bucket}
        for bucket in plan:  # over the limit only when the bucket is one fused group
            if bucket_bytes_of([manifest[i] for i in bucket]) > limit:
                assert len({fused_group(manifest[i][0]) for i in bucket}) == 1
        assert len(groups) == 6
    assert len(bucket_plan(manifest, 1)) == 6  # one bucket per fused group
    assert len(bucket_plan(manifest, 10**6)) == 1
    with pytest.raises(ValueError):
        bucket_plan(manifest, 0)


def test_a_stream_that_no_longer_matches_the_manifest_is_refused():
    group = RefitGroup.create("127.0.0.1", free_port(), 0, 1, "gloo", 30)
    manifest = manifest_of(stream())
    plan = bucket_plan(manifest, 400)
    metrics = send_refit(group, stream(), manifest, plan)
    assert metrics["refit/buckets"] == len(plan) and metrics["refit/gib"] * 2**30 == bucket_bytes_of(manifest)
    changed = stream()
    changed[2] = (changed[2][0], torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="refit stream entry 2 .* the manifest has"):
        send_refit(group, changed, manifest, plan)
    with pytest.raises(RuntimeError, match="ended after 8 tensors"):
        send_refit(group, stream()[:-1], manifest, plan)
    with pytest.raises(RuntimeError, match="the manifest has the end of the stream"):
        send_refit(group, stream() + [("extra", torch.zeros(1))], manifest, plan)
    group.publish("layout", (manifest, plan))
    assert group.fetch("layout") == (manifest, plan)
    group.close()


def test_three_processes_receive_the_stream_bit_for_bit_beside_their_default_group(tmp_path):
    procs = start_ranks([str(WORKER), "stream", str(free_port()), str(tmp_path)], tmp_path, 3, "stream")
    assert wait_all(procs, timeout=120) == [0, 0, 0], logs(tmp_path, "stream")
    for rank in (1, 2):
        got = torch.load(tmp_path / f"stream{rank}.pt")
        assert len(got["plan"]) > 2  # several buckets
        assert list(got["received"]) == [name for name, _ in stream()]
        for name, tensor in stream():
            assert got["received"][name].dtype == tensor.dtype and torch.equal(got["received"][name], tensor), name


def _run_trainer_and_receiver(tmp_path: Path, receiver: str) -> tuple[dict, dict]:
    port = str(free_port())
    trainer = start_ranks([str(WORKER), "trainer", port, str(tmp_path)], tmp_path, 2, "trainer")
    other = start_ranks([str(WORKER), receiver, port, str(tmp_path)], tmp_path, 1, receiver)
    assert wait_all(trainer + other, timeout=300) == [0, 0, 0], logs(tmp_path, "trainer") + logs(tmp_path, receiver)
    return torch.load(tmp_path / "trainer0.pt"), torch.load(tmp_path / "receiver.pt")


def test_a_tp2_trainer_refits_transformers_in_another_process_to_our_logits(tmp_path):
    ours, theirs = _run_trainer_and_receiver(tmp_path, "receiver")
    assert ours["buckets"] > 2 and ours["metrics0"]["refit/buckets"] == ours["buckets"]
    for version in (0, 1):
        torch.testing.assert_close(theirs[f"logits{version}"], ours[f"logits{version}"], atol=1e-4, rtol=1e-4)
    assert (ours["logits1"] - ours["logits0"]).abs().max() > 0.05  # the second refit carried new weights


def test_negative_control_a_bucket_left_unloaded_gives_other_logits(tmp_path):
    ours, theirs = _run_trainer_and_receiver(tmp_path, "receiver_skip")
    assert not torch.allclose(theirs["logits0"], ours["logits0"], atol=1e-2)
