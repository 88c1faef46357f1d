"""Reliability building blocks, in-process and fast: verified resume selection, reward and
non-finite guards, the skip of a non-finite update, the preemption flag, the watchdog's dumps."""

from __future__ import annotations

import logging
import math
import os
import signal
import time

import pytest
import torch

from nemo_rlsr.trainer.checkpoint import _remove, find_resumable_checkpoint
from nemo_rlsr.rewards.result import RewardResult, RewardRangeError
from nemo_rlsr.trainer.guards import NonFiniteError, NonFiniteGuard
from nemo_rlsr.trainer.manifest import MANIFEST, verify_checkpoint, write_manifest
from nemo_rlsr.trainer.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from nemo_rlsr.trainer.watchdog import StepWatchdog


def fake_checkpoint(root, step: int, manifest: bool = True):
    path = root / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(os.urandom(4096))
    (path / ".metadata").write_bytes(b"meta" * 10)
    (path / "common.pt").write_bytes(b"common")
    if manifest:
        write_manifest(path)
    (root / "latest").write_text(path.name + "\n")
    return path


@pytest.mark.parametrize("damage", ["truncate", "garble", "drop_manifest", "delete_metadata"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog, damage):
    older, newest = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 3)
    assert find_resumable_checkpoint(tmp_path) == newest and verify_checkpoint(newest) == []
    shard = newest / "__0_0.distcp"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "garble":  # same size: only the checksum can tell
        data = bytearray(shard.read_bytes())
        data[100:108] = b"\x00" * 8 if data[100:108] != b"\x00" * 8 else b"\x01" * 8
        shard.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (newest / MANIFEST).unlink()
    else:
        (newest / ".metadata").unlink()
    with caplog.at_level(logging.WARNING, logger="nemo_rlsr.trainer.checkpoint"):
        assert find_resumable_checkpoint(tmp_path) == older
    assert "skipping incomplete or corrupt checkpoint" in caplog.text and newest.name in caplog.text
    if damage == "garble":
        assert "sha256" in caplog.text
        assert find_resumable_checkpoint(tmp_path, checksums=False) == newest  # sizes alone miss it
    # Nothing usable at all: None, after a warning for each.
    (older / MANIFEST).unlink()
    assert find_resumable_checkpoint(tmp_path) is None


def test_removal_never_leaves_a_half_deleted_step_directory(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    _remove(path)
    assert not list(tmp_path.glob("step_*"))


def scores(rewards: list[float]) -> RewardResult:
    values = torch.tensor(rewards)
    return RewardResult(values, torch.zeros_like(values), torch.zeros(len(rewards), dtype=torch.bool),
                        *[torch.zeros(len(rewards), dtype=torch.bool)] * 3, torch.zeros(len(rewards), dtype=torch.long))


def test_rewards_outside_the_cosine_range_name_index_and_prompt():
    scores([-1.0, 0.0, 1.0]).check(["a", "b", "c"])
    for bad in [float("nan"), 1.5, -1.01, float("inf")]:
        with pytest.raises(RewardRangeError, match=r"rewards\[1\] = .*\(prompt 'why\?'\)"):
            scores([0.5, bad, 0.2]).check(["ok", "why?", "fine"])


def test_nonfinite_guard_counts_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(max_consecutive=2)
    bad, good = {"nonfinite": 1.0, "loss": math.nan, "grad_norm": math.nan}, {"nonfinite": 0.0}
    assert guard.observe(1, bad) and not guard.observe(2, good)
    guard.check()  # a single skip in a row: fine
    guard.observe(3, bad)
    guard.check()
    guard.observe(4, bad)
    with pytest.raises(NonFiniteError, match=r"2 consecutive .* step 4 .*trainer.max_consecutive_nonfinite=2"):
        guard.check()
    assert guard.state_dict() == {"consecutive": 2, "total": 3}


def test_nonfinite_update_is_skipped_and_leaves_weights_untouched(single_rank):
    from distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.trainer.fingerprint import parameters_sha256

    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
    batch = token_batch()
    before = parameters_sha256(policy.module)

    def nan_loss(logprobs, entropy, mb):
        loss, metrics = nll_loss(logprobs, entropy, mb)
        return loss * float("nan"), {"loss": metrics["loss"] * float("nan")}

    def nan_grad_finite_loss(logprobs, entropy, mb):  # d sqrt(x)/dx at 0 is inf; inf * 0 = NaN
        zero = (logprobs * mb.loss_mask).sum() * 0.0
        return zero.abs().sqrt(), {"loss": zero.detach()}

    for loss_fn in [nan_loss, nan_grad_finite_loss]:
        metrics = policy.train_step(batch, 2, loss_fn, skip_nonfinite=True)
        assert metrics["nonfinite"] == 1.0 and metrics["update_skipped"] == 1.0, loss_fn.__name__
        assert parameters_sha256(policy.module) == before, loss_fn.__name__
    # ... and the next finite update works from clean gradients.
    metrics = policy.train_step(batch, 2, nll_loss, skip_nonfinite=True)
    assert metrics["nonfinite"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert parameters_sha256(policy.module) != before


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_the_guarded_update_is_bit_identical_to_the_plain_one(single_rank, distributed):
    """The guard's extra prepare_grads + grad-norm pass must not change a finite update."""
    from distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.trainer.fingerprint import parameters_sha256

    plain = MegatronPolicy(tiny_model_config(), optimizer_config(distributed), VOCAB, single_rank)
    guarded = MegatronPolicy(tiny_model_config(), optimizer_config(distributed), VOCAB, single_rank)
    guarded.module.load_state_dict(plain.module.state_dict())
    guarded.optimizer.reload_model_params()
    for _ in range(2):
        a = plain.train_step(token_batch(), 2, nll_loss)
        b = guarded.train_step(token_batch(), 2, nll_loss, skip_nonfinite=True)
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    assert parameters_sha256(plain.module) == parameters_sha256(guarded.module)


def test_preemption_flag_from_a_signal():
    handler = PreemptionHandler(["SIGUSR1"]).install(protect_checkpoint_writer=False)
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert handler.should_stop() and handler.received == "SIGUSR1"
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert PREEMPTED_EXIT_CODE == 75
    with pytest.raises(ValueError, match="SIGNOPE"):
        PreemptionHandler(["SIGNOPE"])


def stuck_in_a_slow_step():
    time.sleep(0.6)


def test_watchdog_dumps_stacks_of_an_overrunning_step_once(tmp_path):
    watchdog = StepWatchdog(0.2, tmp_path, rank=3).start()
    try:
        with watchdog.watch("step 1"):
            pass  # fast: no dump
        time.sleep(0.3)
        assert watchdog.dumps == 0
        with watchdog.watch("step 2"):
            stuck_in_a_slow_step()
    finally:
        watchdog.close()
    assert watchdog.dumps == 1
    text = (tmp_path / "rank00003.txt").read_text()
    assert "rank 3" in text and "step 2 running for" in text
    assert "stuck_in_a_slow_step" in text  # the main thread's stack, caught mid-sleep


def test_the_guarded_update_computes_the_gradient_norm_once(single_rank, monkeypatch):
    """skip_nonfinite decides on the norm that clips the update: one norm pass per step, as without
    the guard (it used to ask for the norm, then optimizer.step() computed it again). Counted at
    megatron's get_grad_norm_fp32, which every optimizer class's norm goes through."""
    import megatron.core.optimizer.optimizer as megatron_optimizer

    from distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch
    from nemo_rlsr.models.policy import MegatronPolicy

    calls = []
    real = megatron_optimizer.get_grad_norm_fp32
    monkeypatch.setattr(megatron_optimizer, "get_grad_norm_fp32", lambda *a, **k: calls.append(1) or real(*a, **k))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
    for guarded in (False, True):
        calls.clear()
        metrics = policy.train_step(token_batch(), 2, nll_loss, skip_nonfinite=guarded)
        assert len(calls) == 1, f"skip_nonfinite={guarded}: {len(calls)} gradient-norm passes"
        assert math.isfinite(metrics["grad_norm"]) and metrics["update_skipped"] == 0.0
