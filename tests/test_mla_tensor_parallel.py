"""Multi-latent attention gradients under tensor parallelism (compat/megatron.py's MLA fixes).

On 2 gloo ranks, one optimizer step of a DeepSeek-V3-style policy from the same full weights at TP=1
and at TP=2 with and without sequence parallelism (tests/mla_tp_worker.py): every parameter's
gradient, gathered back to the full tensor, must equal TP=1's up to float32 summation order, and so
must the weights after the step. Without compat/megatron.py's fixes the same comparison fails: megatron's
local spec drops the other TP ranks' part of the rope key's gradient (wrong `linear_kv_down_proj`
rows and everything before them) and `finalize_model_grads` doubles the q latent norm's gradient at
TP=2 without sequence parallelism.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import run_workers

WORKER = Path(__file__).resolve().parent / "mla_tp_worker.py"
# float32 summation order over 2 ranks: ~5e-7 relative per parameter (measured)
GRAD_RTOL = 2e-6
# Adam's first step is lr * g / (|g| + eps): elements whose gradient is ~eps move by a visibly
# different amount for a 1e-7 difference in g (up to ~5e-4 measured); a wrong gradient flips the
# sign of many elements' steps, a move of 2 * lr = 2e-2.
WEIGHT_ATOL = 1e-3


def relative_errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    assert grads.keys() == ref.keys()
    return {name: float((grads[name] - g).norm() / g.norm()) for name, g in ref.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_tp2_gradients_match_tp1_per_parameter(tmp_path, model):
    results = run_workers(model, tmp_path, worker=WORKER, timeout_s=240)
    for rank in results:
        ref = rank["tp1"]
        assert ref["grad_norm"] > 0 and len(ref["grads"]) > 20
        for layout in set(rank) - {"tp1"}:
            out = rank[layout]
            assert out["loss"] == pytest.approx(ref["loss"], rel=1e-6)
            torch.testing.assert_close(out["logprobs"], ref["logprobs"], atol=1e-5, rtol=0)
            errors = relative_errors(out["grads"], ref["grads"])
            assert max(errors.values()) < GRAD_RTOL, (layout, {n: e for n, e in errors.items() if e >= GRAD_RTOL})
            assert out["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
            for name, weight in ref["weights_after"].items():
                torch.testing.assert_close(out["weights_after"][name], weight, atol=WEIGHT_ATOL, rtol=0,
                                           msg=f"{layout} {name}")
    assert set(results[0]) == ({"tp1", "tp2", "tp2_sp"} if model == "dense" else {"tp1", "tp2_sp"})


@pytest.mark.slow
def test_megatron_mla_gradients_differ_without_our_fixes(tmp_path):
    """The same comparison on megatron's own MLA: it fails, so the test above can fail."""
    results = run_workers("dense_unfixed", tmp_path, worker=WORKER, timeout_s=240)[0]
    assert list(results) == ["tp1", "tp2", "tp2_sp"]
    ref = results["tp1"]
    for out in (results["tp2"], results["tp2_sp"]):
        assert out["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # the forward is right
        errors = relative_errors(out["grads"], ref["grads"])
        for layer in (0, 1):  # the rope key rows of the last layer and everything before them
            assert errors[f"decoder.layers.{layer}.self_attention.linear_kv_down_proj.weight"] > 1e-3
        assert errors["decoder.layers.0.mlp.linear_fc1.weight"] > 1e-3
        moved = max((out["weights_after"][n] - w).abs().max() for n, w in ref["weights_after"].items())
        assert moved > 10 * WEIGHT_ATOL
    q_norm = "decoder.layers.1.self_attention.q_layernorm.weight"  # after the last rope key: only the sum is wrong
    doubled = {q_norm: 2 * ref["grads"][q_norm]}
    assert relative_errors({q_norm: results["tp2"]["grads"][q_norm]}, doubled)[q_norm] < GRAD_RTOL
    assert relative_errors(results["tp2_sp"]["grads"], ref["grads"])[q_norm] < GRAD_RTOL
