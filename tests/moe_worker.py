"""One rank of the multi-rank MoE tests: `python moe_worker.py <model | train_ep> <out_dir>`.

`<out_dir>/<model>` is an HF checkpoint written by the test (transformers, random weights). For
each parallel layout in LAYOUTS the rank builds our megatron model from its config.json, streams
its own shard in (hf/load.py), computes the full-vocabulary logits of INPUT_IDS (pipeline stages
hand activations over by send/recv; TP vocabulary shards are gathered) and, at the EP layouts,
exports the model back to HF safetensors (hf/save.py) under `<out_dir>/<model>_export_<layout>`.
Each rank saves {layout: logits} of the layouts where it holds the last stage, and at every layout
the checkpoint bytes its load read with its TP / EP ranks ("{layout}/read"), to
`<out_dir>/rank{RANK}.pt` (see distributed_helpers.run_workers).

`train_ep`: one optimizer step of a tiny MoE MegatronPolicy at EP=1 (DP=2) and at EP=2 from the
same weights (a dist checkpoint saved at EP=1, resharded onto EP=2 on load), each rank with its own
half of the batch: the losses, gradient norms and the logprobs after the step must agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distributed_helpers import VOCAB, nll_loss, optimizer_config, share_weights, token_batch
from nemo_rlsr.config import ModelConfig
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.gpt import build_gpt
from nemo_rlsr.models.hf import adapter_and_config
from nemo_rlsr.models.hf.load import load_hf_weights
from nemo_rlsr.models.hf.save import save_hf_checkpoint
from nemo_rlsr.models.policy import MegatronPolicy, attention_mask

# (name, init_distributed kwargs); 2 ranks each. TP=2 with EP=2 puts half the experts on each TP rank.
LAYOUTS = (
    ("ep2", {"ep": 2}),
    ("tp2", {"tp": 2}),
    ("pp2", {"pp": 2}),
    ("tp2_ep2", {"tp": 2, "ep": 2}),
    ("tp2_etp2", {"tp": 2, "etp": 2}),  # each expert split over the 2 ranks
)
EXPORT_LAYOUTS = ("ep2", "tp2_etp2")
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3, 150, 64, 8, 23, 77, 120, 1],
                          [9, 33, 2, 180, 45, 61, 7, 140, 88, 12, 199, 30]])


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T, V_padded] logits on the last pipeline stage (gathered over TP), None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    mask = attention_mask(torch.ones_like(ids, dtype=torch.bool))
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(ids, positions, mask)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)


def layout_ranks() -> dict[str, int]:
    """This rank's place in the TP, EP and expert-TP groups (what it must read of a checkpoint)."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "ep": ps.get_expert_model_parallel_world_size(), "ep_rank": ps.get_expert_model_parallel_rank(),
            "etp": ps.get_expert_tensor_parallel_world_size()}


def layouts_logits(out: Path, model_name: str) -> dict:
    hf_dir = out / model_name
    adapter, cfg = adapter_and_config(hf_dir)
    result = {"input_ids": INPUT_IDS}
    for name, layout in LAYOUTS:
        ctx = init_distributed(ParallelDims(seed=7, **layout))  # the weights must all come from the checkpoint
        model = build_gpt(cfg, cfg.vocab_size, ctx)
        result[f"{name}/read"] = {"bytes": load_hf_weights(model, adapter, cfg, hf_dir).bytes_read,
                                  **layout_ranks()}
        logits = megatron_logits(model, INPUT_IDS)
        if logits is not None:
            result[name] = logits
        if name in EXPORT_LAYOUTS:
            save_hf_checkpoint(model, adapter, cfg, out / f"{model_name}_export_{name}")
        destroy_distributed()
    return result


def tiny_moe_config() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                       max_sequence_length=32, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                       moe_shared_expert_intermediate_size=32, moe_first_dense_layers=1)


def scenario_train_ep(out: Path) -> dict:
    result = {}
    for ep in (1, 2):
        # another seed per layout: weights come from the checkpoint
        ctx = init_distributed(ParallelDims(seed=ep, ep=ep))
        policy = MegatronPolicy(tiny_moe_config(), optimizer_config(), VOCAB, ctx)
        share_weights(policy, out, first=ep == 1)
        half = token_batch().slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)  # 16 vs 15 loss tokens
        metrics = policy.train_step(half, 1, nll_loss)
        result[f"ep{ep}"] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                             "logprobs": policy.logprobs(half, 1)}
        destroy_distributed()
    return result


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    result = scenario_train_ep(out) if scenario == "train_ep" else layouts_logits(out, scenario)
    torch.save(result, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
