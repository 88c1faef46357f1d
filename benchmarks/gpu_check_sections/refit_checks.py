"""Section `refit_broadcast`: the refit of an engine in another process (weight_sync/broadcast.py)
on the check's device.

One GPU cannot hold two NCCL ranks, so the section checks the parts separately:
* the refit group's NCCL form: `ProcessGroupNCCL` on a PrefixStore beside the default NCCL group
  (the constructor this torch build has), one bucket broadcast through it;
* the bytes: the policy's HF-named stream packed into buckets on the device, unpacked and loaded
  into transformers' LlamaForCausalLM, whose logprobs must be the policy's (fx.hf_llama's check, on
  the received tensors instead of the stream itself); sender throughput (TP gathers, casts, packing);
* a changed stream (one tensor's shape) is refused.
On the CPU (`--smoke`) the group is gloo.
"""

from __future__ import annotations

import torch

from . import fixtures as fx
from .options import Options
from .record import SectionRecord, timed

LOGPROB_TOL = 1e-4


class Loopback:
    """A refit group of one process that hands each sent bucket to the receive that follows (the
    transport a second GPU would provide)."""

    def __init__(self) -> None:
        self.buckets: list[torch.Tensor] = []
        self.receiving = False  # sends first, then the receives

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.receiving:
            tensor.copy_(self.buckets.pop(0))
        else:
            self.buckets.append(tensor.clone())


def refit_broadcast(rec: SectionRecord, opts: Options) -> None:
    from nemo_rlsr.distributed.parallel import free_port
    from nemo_rlsr.models.hf import adapter_for
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.weight_sync.broadcast import RefitGroup, bucket_plan, manifest_of, receive_refit, send_refit
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    s = fx.shape(opts.smoke)
    ctx = fx.start_megatron()
    policy = MegatronPolicy(s.model, None, s.vocab, ctx)
    fx.randomize_norms(policy.module)
    llama = adapter_for("llama")
    device = fx.device()

    def stream():
        return ((n, t.detach()) for n, t in hf_named_tensors(policy.module, llama, s.model, s.vocab))

    manifest = manifest_of(stream())
    plan = bucket_plan(manifest, 2**15 if opts.smoke else 2**26)  # several buckets either way
    rec.metric("stream", {"tensors": len(manifest), "buckets": len(plan)})

    def nccl_group() -> None:
        backend = "nccl" if device.type == "cuda" else "gloo"
        group = RefitGroup.create("127.0.0.1", free_port(), 0, 1, backend, 60)
        seconds, metrics = timed(lambda: send_refit(group, stream(), manifest, plan), repeat=3, warmup=1)
        rec.metric("group_send", {"backend": backend, "seconds": seconds, "gib": metrics["refit/gib"],
                                  "gib_per_s": metrics["refit/gib"] / seconds})
        rec.check("refit_group_broadcasts", metrics["refit/buckets"] == len(plan), f"{backend} group of one")
        changed = list(stream())
        changed[1] = (changed[1][0], changed[1][1][:1])
        try:
            send_refit(group, changed, manifest, plan)
            refused = False
        except RuntimeError:
            refused = True
        rec.check("changed_stream_refused", refused)

    def received_logprobs_match() -> None:
        loop = Loopback()
        send_refit(loop, stream(), manifest, plan)
        loop.receiving = True
        received: dict[str, torch.Tensor] = {}
        receive_refit(loop, manifest, plan, received.update, device)
        rec.check("every_tensor_received", list(received) == [name for name, _, _ in manifest])
        batch = fx.synthetic_rollouts(s, seed=3).to_token_batch()
        ours = fx.plain_logprobs(policy.module, batch, s.vocab)

        def diff_with(state) -> float:
            hf = fx.hf_llama(policy.module, s.model, s.vocab, state=state)
            return fx.masked_abs_diff(fx.hf_logprobs(hf, batch), ours, batch.loss_mask)

        diff = diff_with(received)
        rec.metric("received_vs_policy_logprobs", {"max_abs": diff[0], "mean_abs": diff[1]})
        rec.check("received_weights_give_policy_logprobs", diff[0] < LOGPROB_TOL, f"max |diff| {diff[0]:.2e}")
        name = manifest[len(manifest) // 2][0]  # negative control: one received tensor changed
        control = diff_with(received | {name: received[name] * 1.5})
        rec.check("negative_control_changed_tensor_differs", control[0] > 100 * LOGPROB_TOL,
                  f"{name} x 1.5: max |diff| {control[0]:.2e}")

    rec.attempt("refit_group_broadcasts", nccl_group)
    rec.attempt("received_weights_give_policy_logprobs", received_logprobs_match)
