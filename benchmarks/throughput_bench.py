"""Reward phase throughput: sentence-transformers' plain encode() vs our in-process reward vs
the Ray pool, on the same rollouts with a realistic length mix (benchmarks/texts.py).

    python benchmarks/throughput_bench.py [--responses 128] [--encoder minilm-l6]
        [--encoder qwen3-tiny-random | qwen3-8b-random] [--device auto] [--actors 2]

* baseline: ``SentenceTransformer.encode`` of every response and every reference (one per
  rollout, as a reward without a cache would), cosine; no repetition check.
* in-process: ``EmbeddingSimilarityReward.score`` (token-budget length-sorted batches, one
  embedding per distinct reference, repetition checks beside the encoder). A separate line
  compares the two encoders alone on the responses, without the reference dedup.
* ray pool: ``RayRewardPool.score`` with ``--actors`` actors (1 CPU each on a CPU machine, 1
  GPU each on a GPU machine), after a warm-up call on other rollouts.

Reference caches start cold in every timed call (GRPO's 8 rollouts per reference still share
one embedding). ``--encoder qwen3-8b-random`` builds a Qwen3-Embedding-8B-shaped model with
random weights (bf16 on a GPU; ~16 GB written to a temporary folder) and reports tokens/s and
MFU against ``--peak-tflops`` (H100/H200 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from texts import rollouts  # noqa: E402

from nemo_rlsr.config import RewardConfig  # noqa: E402
from nemo_rlsr.rewards import EmbeddingSimilarityReward, RepetitionPenalty  # noqa: E402
from nemo_rlsr.rewards.random_qwen import build_random_qwen3_embedding  # noqa: E402


def reward_config(args, path: str | None) -> RewardConfig:
    name = "minilm-l6" if args.encoder == "minilm-l6" else "qwen3-embedding-8b"
    return RewardConfig(encoder=name, encoder_path=path, encoder_max_tokens=args.max_tokens,
                        batch_size=args.batch_size, long_response=args.long_response)


def encoder_folder(args, device: str, tmp: str) -> str | None:
    if args.encoder == "minilm-l6":
        return None
    shape = "8b" if args.encoder == "qwen3-8b-random" else "tiny"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    path = build_random_qwen3_embedding(tmp, shape, device=device, dtype=dtype,
                                        max_seq_length=args.max_tokens or 4096)
    print(f"built a random {shape} Qwen3-Embedding folder in {time.perf_counter() - t0:.0f} s")
    return path


def forward_flops(reward: EmbeddingSimilarityReward, texts: list[str]) -> float:
    """FLOPs of one forward over the real (unpadded) tokens of ``texts``: 2 x non-embedding
    parameters per token, plus causal attention (QK^T and AV: 2 x 2 x layers x width x len^2 / 2)."""
    model = reward.encoder.model[0].auto_model
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    cfg = model.config
    width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    pieces, *_ = reward.encoder.pieces(texts)
    return sum(2 * params * len(p) + 2 * cfg.num_hidden_layers * width * len(p) ** 2 for p in pieces)


def timed(fn, repeat: int = 2) -> float:
    """Best of ``repeat`` wall times in seconds (development machines are shared)."""
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=128)
    parser.add_argument("--encoder", default="minilm-l6", choices=["minilm-l6", "qwen3-tiny-random", "qwen3-8b-random"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--max-tokens", type=int, default=None, help="encoder window (default: the model's)")
    parser.add_argument("--long-response", default="truncate", choices=["truncate", "chunk"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="Ray actors (default: 2 on CPU, GPUs on GPU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    print(f"== reward throughput: {args.responses} responses, encoder {args.encoder}, device {device} "
          f"(GPU: {gpu}), torch threads {torch.get_num_threads()} ==")
    prompts, responses, references = rollouts(args.responses, seed=0)
    warm = rollouts(16, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        path = encoder_folder(args, device, tmp)
        cfg = reward_config(args, path)
        first = EmbeddingSimilarityReward.from_config(cfg, device)
        _, _, cut, chunked = first.encoder.pieces(responses)
        print(f"encoder window {first.encoder.max_tokens} tokens, policy {args.long_response}; "
              f"{int((cut | chunked).sum())} of {len(responses)} responses are longer")
        penalty = RepetitionPenalty()
        st = first.encoder.model
        prompt = first.encoder.prompt or None

        def baseline():
            kwargs = dict(batch_size=args.batch_size, normalize_embeddings=True, convert_to_tensor=True,
                          show_progress_bar=False, prompt=prompt)
            (st.encode(responses, **kwargs) * st.encode(references, **kwargs)).sum(-1)

        def in_process():
            EmbeddingSimilarityReward(first.encoder, penalty).score(prompts, responses, references)

        EmbeddingSimilarityReward(first.encoder, penalty).score(*warm)  # warm-up: kernels, allocator
        results = {"sentence-transformers encode() baseline": timed(baseline),
                   "in-process reward (ours)": timed(in_process)}
        # The encoders alone on the responses only: batching, without the reference dedup.
        plain = timed(lambda: st.encode(responses, batch_size=args.batch_size, normalize_embeddings=True,
                                        convert_to_tensor=True, show_progress_bar=False, prompt=prompt))
        ours = timed(lambda: first.encoder.encode(responses))
        print(f"encoders alone, responses only: encode() {args.responses / plain:.1f}/s, ours "
              f"{args.responses / ours:.1f}/s ({plain / ours:.2f}x)")
        if device == "cuda" and args.encoder != "minilm-l6":
            sec = results["in-process reward (ours)"]
            flops = forward_flops(first, responses) + forward_flops(first, sorted(set(references)))
            print(f"in-process: {flops / sec / 1e12:,.1f} TFLOP/s = MFU {flops / sec / 1e12 / args.peak_tflops:.1%} "
                  f"of {args.peak_tflops:.0f} TFLOP/s")
        first.close()
        first = st = None  # drop the encoder before the pool measurement loads its own copies
        if device == "cuda":
            torch.cuda.empty_cache()

        try:
            import ray  # noqa: F401

            from nemo_rlsr.rewards.ray_pool import RayRewardPool
        except ImportError:
            print("ray is not installed (pip install nemo-rlsr[ray]): no pool measurement")
        else:
            gpus = torch.cuda.device_count() if device == "cuda" else 0
            actors = args.actors or (gpus or 2)
            pool_cfg = RewardConfig(**{**cfg.__dict__, "backend": "ray", "ray_num_actors": actors,
                                       "ray_cpus_per_actor": 1.0, "ray_gpus_per_actor": 1.0 if gpus else 0.0})
            pool = RayRewardPool(pool_cfg, "nemo_rlsr_reward_bench")
            pool.score(*warm)
            results[f"Ray pool, {actors} actor(s) (ours)"] = timed(lambda: pool.score(prompts, responses, references))
            pool.close()

    base = results["sentence-transformers encode() baseline"]
    for name, sec in results.items():
        print(f"  {name:42s} {args.responses / sec:9.1f} responses/s   {base / sec:5.2f}x baseline")


if __name__ == "__main__":
    main()
