"""One process of tests/test_refit_broadcast.py: `python refit_broadcast_worker.py <scenario> <port> <out>`.

Scenarios (each process has a default gloo group of its own job first, as a TensorRT-LLM worker or
a megatron trainer does, and joins the refit group beside it):
* `stream`: 3 processes of one job; group rank 0 sends `stream()` (mixed dtypes, odd sizes, a fused
  q/k/v and gate/up) in small buckets, ranks 1 and 2 save what they receive.
* `trainer`: 2 processes, a TP=2 megatron Llama; rank 0 sends the HF-named stream to the receiver
  (refit group of 2), rank 1 takes part in the stream's TP gathers only. Version 0 is the random
  weights, version 1 the weights after an in-place update of every parameter; rank 0 saves our
  (TP-gathered) logits of both.
* `receiver` / `receiver_skip`: 1 process; a transformers LlamaForCausalLM loaded from the received
  refits, its logits of both versions saved. `receiver_skip` leaves the first bucket unloaded (the
  negative control: its logits must not match).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

HIDDEN, VOCAB = 64, 96
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
BUCKET_BYTES = 40_000  # several buckets for the tiny model


def stream() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        ("embed.weight", torch.randn(7, 5, generator=g).to(torch.bfloat16)),
        ("layers.0.self_attn.q_proj.weight", torch.randn(6, 4, generator=g)),
        ("layers.0.self_attn.k_proj.weight", torch.randn(3, 4, generator=g)),
        ("layers.0.self_attn.v_proj.weight", torch.randn(3, 4, generator=g)),
        ("layers.0.mlp.gate_proj.weight", torch.randn(9, 4, generator=g).to(torch.bfloat16)),
        ("layers.0.mlp.up_proj.weight", torch.randn(9, 4, generator=g).to(torch.bfloat16)),
        ("counts", torch.arange(5, dtype=torch.int64)),
        ("scale", torch.tensor(0.5)),
        ("big", torch.randn(300, generator=g)),
    ]


def model_config():
    from nemo_rlsr.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, max_sequence_length=32, vocab_size=VOCAB)


def main(scenario: str, port: int, out: Path) -> None:
    import torch.distributed as dist

    from nemo_rlsr.weight_sync.broadcast import RefitGroup, bucket_plan, manifest_of, receive_refit, send_refit

    rank = int(os.environ["RANK"])
    if scenario == "stream":
        dist.init_process_group("gloo")
        group = RefitGroup.create("127.0.0.1", port, rank, 3, "gloo", 60)
        manifest = manifest_of(stream())
        plan = bucket_plan(manifest, 400)
        if rank == 0:
            assert not group.all_ready(7)
            while not group.all_ready(7):  # both receivers inside their receive: then send
                time.sleep(0.01)
            send_refit(group, stream(), manifest, plan)
        else:
            got: dict[str, torch.Tensor] = {}
            time.sleep(0.5 * rank)  # rank 0 must wait for the later one too
            group.signal_ready(7)
            receive_refit(group, manifest, plan, got.update)
            torch.save({"received": {k: v.clone() for k, v in got.items()}, "plan": plan}, out / f"stream{rank}.pt")
    elif scenario == "trainer":
        trainer(rank, port, out)
    else:
        receiver(port, out, skip_first=scenario == "receiver_skip")


@torch.no_grad()
def trainer(rank: int, port: int, out: Path) -> None:
    from hf_worker import megatron_logits

    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_for_model
    from nemo_rlsr.weight_sync.broadcast import RefitGroup, bucket_plan, manifest_of, send_refit
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    cfg = model_config()
    ctx = init_distributed(ParallelDims(tp=2, seed=1))
    model = build_gpt(cfg, VOCAB, ctx).eval()
    norms = torch.Generator().manual_seed(2)  # the same on both ranks: norms are replicated
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.copy_(torch.rand(param.shape, generator=norms) + 0.5)
    adapter = adapter_for_model(cfg)
    manifest = manifest_of(hf_named_tensors(model, adapter, cfg, VOCAB))
    plan = bucket_plan(manifest, BUCKET_BYTES)
    group = RefitGroup.create("127.0.0.1", port, 0, 2, "gloo", 60) if rank == 0 else None
    if group is not None:
        group.publish("layout_and_config", (manifest, plan, adapter.hf_config(cfg)))
    results = {}
    for version in (0, 1):
        if version == 1:
            for param in model.parameters():
                param.mul_(1.1).add_(0.01)
        named = hf_named_tensors(model, adapter, cfg, VOCAB)
        if group is not None:
            results[f"metrics{version}"] = send_refit(group, named, manifest, plan)
        else:
            for _ in named:  # the TP gathers need every rank of the group
                pass
        results[f"logits{version}"] = megatron_logits(model, IDS, VOCAB)
    results["buckets"] = len(plan)
    torch.save(results, out / f"trainer{rank}.pt")


@torch.no_grad()
def receiver(port: int, out: Path, skip_first: bool) -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_rlsr.weight_sync.broadcast import RefitGroup, receive_refit

    dist.init_process_group("gloo")  # its own job's default group, like a TensorRT-LLM worker's
    group = RefitGroup.create("127.0.0.1", port, 1, 2, "gloo", 60)
    manifest, plan, hf_config = group.fetch("layout_and_config")
    hf = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    buckets = iter(range(len(plan)))

    def load(items):
        if skip_first and next(buckets) == 0:
            return
        missing = {name for name, _ in items} - set(hf.state_dict())
        assert not missing, missing
        hf.load_state_dict(dict(items), strict=False)

    results = {}
    for version in (0, 1):
        buckets = iter(range(len(plan)))
        receive_refit(group, manifest, plan, load)
        results[f"logits{version}"] = hf(input_ids=IDS).logits
    torch.save(results, out / "receiver.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
