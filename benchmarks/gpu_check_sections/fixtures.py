"""The model shapes, batches and independent references the GPU check's sections share.

Shapes: `--smoke` is the tiny CPU model of the unit tests; the full run a small model that still
has GQA, several layers and a vocabulary that is not a multiple of 128 (so padded vocabulary ids
exist and must never be sampled). Weights are random (no download); the norms are randomized too
(megatron initializes them to 1, which would hide a misplaced norm from the transformers reference).

References, each computed without megatron's schedule:
* `plain_logprobs`: one forward of the GPTModel, `log_softmax` over the true vocabulary in fp32;
* `hf_llama`: the same weights in transformers' `LlamaForCausalLM` (eager attention) through the
  refit stream (weight_sync.hf_named_tensors), an implementation we did not write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.policy import TokenBatch, attention_mask, position_ids

PAD, EOS = 0, 1


@dataclass(frozen=True)
class Shape:
    model: ModelConfig
    vocab: int  # true vocabulary (the embedding is padded to a multiple of 128)
    prompts: int
    prompt_lengths: tuple[int, int]  # shortest, longest (left padding in every batch)
    new_tokens: int
    group: int  # samples per prompt (GRPO's group)

    @property
    def rows(self) -> int:
        return self.prompts * self.group


def shape(smoke: bool) -> Shape:
    if smoke:
        return Shape(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                 ffn_hidden_size=128, max_sequence_length=48),
                     vocab=61, prompts=4, prompt_lengths=(2, 8), new_tokens=8, group=2)
    return Shape(ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                             ffn_hidden_size=1536, max_sequence_length=256),
                 vocab=4000, prompts=16, prompt_lengths=(8, 64), new_tokens=64, group=4)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def start_megatron(seed: int = 0):
    """One process, TP=PP=1: NCCL on a GPU, gloo with the CPU compatibility layer on a CPU."""
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed

    return init_distributed(ParallelDims(seed=seed))


def randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """`target`'s parameters := `source`'s, cast to `target`'s dtype (same architecture)."""
    with torch.no_grad():
        for (name, dst), (_, src) in zip(target.named_parameters(), source.named_parameters(), strict=True):
            dst.copy_(src.to(dst.dtype))


def random_prompts(s: Shape, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = s.prompt_lengths
    lengths = torch.randint(lo, hi + 1, (s.prompts,), generator=g)
    return [torch.randint(2, s.vocab, (int(n),), generator=g).tolist() for n in lengths]


def synthetic_rollouts(s: Shape, seed: int):
    """A RolloutBatch in the trainer's layout (generation/layout.py) with random responses of random
    lengths, half of them ending in EOS: a training batch that needs no sampler."""
    from nemo_rlsr.generation.layout import rollout_batch

    g = torch.Generator().manual_seed(seed + 1)
    prompts = [p for p in random_prompts(s, seed) for _ in range(s.group)]
    lengths = torch.randint(1, s.new_tokens + 1, (len(prompts),), generator=g).tolist()
    finished = [bool(i % 2) for i in range(len(prompts))]
    responses = [torch.randint(2, s.vocab, (n,), generator=g).tolist()[:-1] + [EOS] if done
                 else torch.randint(2, s.vocab, (n,), generator=g).tolist()
                 for n, done in zip(lengths, finished)]
    logprobs = [[0.0] * len(r) for r in responses]
    return rollout_batch(prompts, responses, logprobs, finished, PAD, s.new_tokens, device())


def model_logits(module: torch.nn.Module, batch: TokenBatch, vocab: int) -> torch.Tensor:
    """fp32 logits over the true vocabulary [B, T, vocab] from one plain forward of the GPTModel
    (eval mode, full sequences: no KV cache, no megatron schedule)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = module(batch.input_ids, position_ids(batch.input_ids), attention_mask(batch.valid))
    finally:
        module.train(was_training)
    return logits[..., :vocab].float()


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def plain_logprobs(module: torch.nn.Module, batch: TokenBatch, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    return logprobs_from_logits(model_logits(module, batch, vocab), batch.targets, temperature)


def hf_llama(module: torch.nn.Module, cfg: ModelConfig, vocab: int, state: dict[str, torch.Tensor] | None = None):
    """transformers' LlamaForCausalLM holding `module`'s weights, fp32, on the same device: from the
    refit stream, or from `state` (the HF-named tensors an engine received from it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_rlsr.models.hf import adapter_for
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    llama = adapter_for("llama")
    fields = llama.hf_config(dataclasses.replace(cfg, vocab_size=vocab, params_dtype="float32"))
    config = LlamaConfig(**fields)
    config._attn_implementation = "eager"  # fully masked (left-pad) query rows stay finite
    hf = LlamaForCausalLM(config)
    named = state.items() if state is not None else hf_named_tensors(module, llama, cfg, vocab)
    state = {name: tensor.detach().float().cpu() for name, tensor in named}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"refit names do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(device()).eval()


def hf_logprobs(hf, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.valid.long(),
                    position_ids=position_ids(batch.input_ids)).logits
    return logprobs_from_logits(logits, batch.targets, temperature)


def masked_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |a - b| over the positions where `mask` is set."""
    diff = (a.float() - b.float()).abs()[mask.bool()]
    return float(diff.max()), float(diff.mean())


def token_mult_prob_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """exp(mean |a - b|) over masked tokens: the trainer's `token_mult_prob_error` (1.0 = identical)."""
    mask = mask.float()
    return float(torch.exp(((a.float() - b.float()).abs() * mask).sum() / mask.sum().clamp(min=1)))


def describe(policy) -> dict:
    """The facts of a built policy that decide its numerics (for the JSON)."""
    params = list(policy.weights.parameters())
    config = policy.config
    return {"parameters": policy.num_parameters, "param_dtypes": sorted({str(p.dtype) for p in params}),
            "param_devices": sorted({str(p.device) for p in params}), "spec": layer_spec(policy),
            "transformer_config_bf16": getattr(config, "bf16", None),
            "transformer_config_params_dtype": str(config.params_dtype),
            # TF32 would move fp32 logprobs by ~1e-3: which one ran, once everything is imported
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def layer_spec(policy) -> str:
    """Which layer spec the builder picked (Transformer Engine's or megatron's local one)."""
    qkv = policy.chunks[0].decoder.layers[0].self_attention.linear_qkv
    return "transformer_engine" if "transformer_engine" in type(qkv).__module__ else "local"
