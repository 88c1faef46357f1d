"""Policy train-step throughput: our MegatronPolicy.train_step against a Hugging Face transformers
training step of the same model, same batch, in the same process.

    python benchmarks/train_step_bench.py                  # GPU: Qwen2.5-1.5B shape, bf16, batch 4 x 2048
    python benchmarks/train_step_bench.py --tiny --steps 1 # CPU smoke test (fp32, a tiny Qwen2 shape)
    python benchmarks/train_step_bench.py --fp8-recipe tensorwise   # the FP8 variant's recipe (TE only)

Both models are built from configs with random weights (no download): the cost per token is the
real one. Variants, run one after another (each freed before the next):

* ``hf``: ``Qwen2ForCausalLM`` (SDPA attention) in the benchmark dtype, ``torch.optim.AdamW`` on
  its parameters, loss = HF's causal-LM cross entropy.
* ``megatron``: ``MegatronPolicy.train_step`` (megatron DDP, megatron Adam with fp32 main weights
  when the parameters are bf16, logprobs and entropy from vocab-parallel logits), with whichever
  layer spec the policy builder picks (Transformer Engine's when it imports, else the local one;
  the line says which).
* ``megatron_fp8``: the same with ``model.fp8=hybrid`` when Transformer Engine imports and
  ``models/precision.fp8_problems`` accepts the config on this GPU; otherwise the line says why not.

Each line reports tokens/s (all tokens of the batch) and MFU = model FLOPs per step / step time /
peak dense bf16 FLOP/s of the GPU (H100 and H200 SXM: 989 TFLOP/s; ``--peak-tflops`` overrides; no
MFU on a CPU). Model FLOPs = 6 x (non-embedding parameters + the LM head) x tokens + causal
attention 6 x layers x q_width x seq^2 x batch (QK^T and AV, forward and backward, half masked).
The megatron lines add ``ratio_vs_hf`` (tokens/s over the hf line's). The megatron parameter
count is checked against HF's: a mismatch means the two did not build the same architecture, and
the line says so (``same_shape=False``).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from nemo_rlsr.config import ModelConfig, OptimizerConfig, RLSRConfig

# Qwen2.5-1.5B (config.json of the released model): tied embeddings, qkv bias, GQA 12/2.
QWEN25_1_5B = dict(num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2,
                   ffn_hidden_size=8960, vocab=151936, rope_theta=1_000_000.0, rms_eps=1e-6)
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, vocab=256, rope_theta=1_000_000.0, rms_eps=1e-6)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def model_flops(shape: dict, batch: int, seq: int) -> float:
    h, layers = shape["hidden_size"], shape["num_layers"]
    head = h // shape["num_attention_heads"]
    kv = shape["num_query_groups"] * head
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * shape["ffn_hidden_size"] + 2 * h
    matmul_params = layers * per_layer + h + shape["vocab"] * h  # + final norm + LM head
    attention = 6 * layers * h * seq * seq * batch
    return 6.0 * matmul_params * batch * seq + attention


def make_batch(shape: dict, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, shape["vocab"], (batch, seq), generator=g).to(device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, warmup: int, steps: int) -> float:
    """Mean seconds per call of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def hf_step(shape: dict, ids: torch.Tensor, dtype: torch.dtype, lr: float):
    """(step function, parameter count) of a HF Qwen2 training step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden_size"], intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"], max_position_embeddings=ids.shape[1],
        rope_theta=shape["rope_theta"], rms_norm_eps=shape["rms_eps"], tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with ids.device:  # initialise on the GPU (a 1.5B fp32 init on the host takes minutes on few cores)
        model = Qwen2ForCausalLM(config).to(dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def megatron_model_config(shape: dict, seq: int, dtype: torch.dtype, fp8_recipe: str | None) -> ModelConfig:
    return ModelConfig(
        num_layers=shape["num_layers"], hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"], num_query_groups=shape["num_query_groups"],
        ffn_hidden_size=shape["ffn_hidden_size"], max_sequence_length=seq, tie_embeddings=True,
        rotary_base=int(shape["rope_theta"]), add_qkv_bias=True, params_dtype=str(dtype).removeprefix("torch."),
        fp8="hybrid" if fp8_recipe else None, fp8_recipe=fp8_recipe or "delayed",
    )


def megatron_step(model_cfg: ModelConfig, ids: torch.Tensor, vocab: int, lr: float, ctx):
    """(step function, parameter count, layer spec name, parameter dtype) of a MegatronPolicy train step."""
    from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch

    policy = MegatronPolicy(model_cfg, OptimizerConfig(lr=lr, clip_grad=1.0), vocab, ctx)
    ones = torch.ones_like(ids, dtype=torch.bool)
    loss_mask = torch.ones(ids.shape, device=ids.device)
    loss_mask[:, -1] = 0.0  # the last position has no next token
    batch = TokenBatch(ids, ones, loss_mask, {})

    def nll(logprobs, entropy, mb):
        loss = (-logprobs * mb.loss_mask).sum()
        return loss, {"loss": loss.detach()}

    def step():
        policy.train_step(batch, micro_batch_size=len(batch), loss_fn=nll)

    qkv = policy.module.decoder.layers[0].self_attention.linear_qkv
    spec = "transformer_engine" if "transformer_engine" in type(qkv).__module__ else "local"
    return step, policy.num_parameters, spec, str(next(policy.module.parameters()).dtype).removeprefix("torch.")


def report(name: str, seconds: float, tokens: int, flops: float, peak: float | None, extra: dict) -> dict:
    fields = {"variant": name, "step_s": f"{seconds:.4f}", "tokens_per_s": f"{tokens / seconds:.1f}",
              "tflops": f"{flops / seconds / 1e12:.2f}",
              "mfu": f"{flops / seconds / (peak * 1e12):.3f}" if peak else "n/a"}
    memory = peak_memory_gb()
    if memory is not None:
        fields["peak_mem_gib"] = f"{memory:.1f}"
    fields.update(extra)
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
    return fields


def fp8_refusal(model_cfg: ModelConfig) -> str | None:
    from nemo_rlsr.models.fp8_support import cuda_runtime_version
    from nemo_rlsr.models.precision import fp8_problems, gpu_capability, installed_te_version

    problems = fp8_problems(RLSRConfig(model=model_cfg), installed_te_version(), gpu_capability(),
                            cuda_runtime_version())
    return "; ".join(problems) or None


def main(argv: list[str] | None = None, lines: list[dict] | None = None) -> list[dict]:
    """Runs the variants; appends each printed line's fields to `lines` as it goes (so a caller keeps
    the lines of the variants that ran when a later one fails: benchmarks/gpu_check.py) and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 shape (CPU smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 32)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--fp8-recipe", default="tensorwise", help="recipe of the megatron_fp8 variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (MFU denominator)")
    args = parser.parse_args(argv)

    from nemo_rlsr.distributed.dims import ParallelDims

    from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed

    shape = TINY if args.tiny else QWEN25_1_5B
    batch, seq = args.batch or (2 if args.tiny else 4), args.seq_len or (32 if args.tiny else 2048)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 GEMMs are emulated: fp32 there
    tokens, flops, peak = batch * seq, model_flops(shape, batch, seq), peak_tflops(args.peak_tflops)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device={gpu.replace(' ', '_')} shape={'tiny' if args.tiny else 'qwen2.5-1.5b'} dtype={dtype} "
          f"batch={batch} seq_len={seq} tokens_per_step={tokens} model_tflop_per_step={flops / 1e12:.3f} "
          f"peak_tflops={peak or 'n/a'}", flush=True)

    ids = make_batch(shape, batch, seq, device)
    step, hf_params = hf_step(shape, ids, dtype, args.lr)
    hf_seconds = timed(step, args.warmup, args.steps)
    lines = [] if lines is None else lines
    lines.append(report("hf", hf_seconds, tokens, flops, peak,
                        {"param_dtype": str(dtype).removeprefix("torch."), "params": hf_params}))
    del step
    free_memory()

    ctx = init_distributed(ParallelDims(seed=0))
    try:
        for name, recipe in (("megatron", None), ("megatron_fp8", args.fp8_recipe)):
            model_cfg = megatron_model_config(shape, seq, dtype, recipe)
            refusal = fp8_refusal(model_cfg) if recipe else None
            if refusal:
                print(f"variant={name} skipped: {refusal}", flush=True)
                lines.append({"variant": name, "skipped": refusal})
                continue
            step, params, spec, param_dtype = megatron_step(model_cfg, ids, shape["vocab"], args.lr, ctx)
            seconds = timed(step, args.warmup, args.steps)
            lines.append(report(name, seconds, tokens, flops, peak,
                                {"spec": spec, "param_dtype": param_dtype, "params": params, "same_shape": params == hf_params,
                                 "ratio_vs_hf": f"{hf_seconds / seconds:.2f}"}))
            del step
            free_memory()
    finally:
        destroy_distributed()
    return lines


if __name__ == "__main__":
    main()
