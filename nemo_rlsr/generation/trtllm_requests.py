"""TensorRT-LLM requests and their outputs, as plain data: what the engine leader sends and receives.

Pure functions (no TensorRT-LLM import), so every rule here is tested on the CPU
(tests/test_rollout_engines.py). Read in TensorRT-LLM's 1.2-line source:

* tensorrt_llm/sampling_params.py, `SamplingParams._validate`: top_k == 1, top_p == 0, temperature == 0
  (or none of the three given) means greedy, and greedy with best_of (default n) > 1 raises. A greedy
  request for n samples therefore goes out as n requests of one sample (`request_plan`).
* tensorrt_llm/executor/result.py, `_handle_sequence`: a completion that ends on a stop token id
  (`stop_token_ids`) keeps that id in `token_ids` only with `include_stop_str_in_output`; whether an
  `end_id` finish leaves the end token in `token_ids` is the sampler's business and not promised. So EOS
  is a stop token kept in the output and `end_id` is off (-1), as verl's TensorRT-LLM rollout does
  (verl/workers/rollout/trtllm_rollout/trtllm_async_server.py); `completions` refuses a "stop" finish
  whose tokens do not end with EOS, rather than train on a response that lost it.
* Outputs: `outputs[j].token_ids`, `.logprobs` (one {token_id: Logprob} dict per token with
  `logprobs=1`), `.finish_reason` "stop" / "length".
"""

from __future__ import annotations

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.layout import rollout_batch

Completion = tuple[list[int], list[float], bool]  # token ids, their logprobs, ended on EOS


def sampling_kwargs(params: SamplingParams, seed: int, eos_id: int, pad_id: int) -> dict:
    """`tensorrt_llm.SamplingParams` arguments of one request (its n samples share the prompt)."""
    if params.stop:
        raise ValueError("rollout.stop strings are not supported by the trtllm engine (word-level tokenizer); "
                         "use stop_on_eos")
    kwargs = {
        "max_tokens": params.max_new_tokens, "n": params.n, "seed": seed, "logprobs": 1,
        "pad_id": pad_id, "detokenize": False,
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
        "end_id": -1,  # EOS ends a row as a stop token (below), which keeps it in token_ids
    }
    if params.stop_on_eos:
        kwargs |= {"stop_token_ids": [eos_id], "include_stop_str_in_output": True}
    if params.greedy:
        kwargs |= {"top_k": 1, "top_p": 1.0}
    return kwargs


def request_plan(params: SamplingParams, seeds: list[int], eos_id: int, pad_id: int) -> list[tuple[int, dict]]:
    """(prompt index, sampling arguments) of every request: one request of n samples per prompt, or,
    greedy, n requests of one sample each (TensorRT-LLM refuses greedy with n > 1)."""
    split = params.greedy and params.n > 1
    plan = []
    for prompt, seed in enumerate(seeds):
        kwargs = sampling_kwargs(params, seed, eos_id, pad_id)
        if split:
            plan += [(prompt, kwargs | {"n": 1}) for _ in range(params.n)]
        else:
            plan.append((prompt, kwargs))
    return plan


def completions(results, prompt_of: list[int], n_prompts: int, n: int, eos_id: int) -> list[list[Completion]]:
    """Per prompt, its n completions from the `RequestOutput`s of `request_plan`'s requests
    (`prompt_of[i]`: the prompt of request i)."""
    groups: list[list[Completion]] = [[] for _ in range(n_prompts)]
    for prompt, result in zip(prompt_of, results, strict=True):
        for output in result.outputs:
            tokens = list(output.token_ids)
            finished = output.finish_reason == "stop"
            if finished and (not tokens or tokens[-1] != eos_id):
                raise RuntimeError(f"TensorRT-LLM finished a completion with 'stop' but its token_ids {tokens[-4:]} "
                                   f"do not end with EOS ({eos_id}): the sampling arguments did not keep it")
            logprobs = [_token_logprob(entry, token) for entry, token in zip(output.logprobs, tokens, strict=True)]
            groups[prompt].append((tokens, logprobs, finished))
    if any(len(group) != n for group in groups):
        raise ValueError(f"expected {n} completions per prompt, got {[len(g) for g in groups]}")
    return groups


def completions_to_rollout(prompts: list[list[int]], per_prompt: list[list[Completion]], pad_id: int,
                           max_new_tokens: int, device) -> RolloutBatch:
    rows = [prompt for prompt, group in zip(prompts, per_prompt) for _ in group]
    flat = [c for group in per_prompt for c in group]
    return rollout_batch(rows, [c[0] for c in flat], [c[1] for c in flat], [c[2] for c in flat],
                         pad_id, max_new_tokens, device)


def _token_logprob(entry, token: int) -> float:
    if isinstance(entry, dict):  # {token_id: Logprob(logprob=..., rank=...)}
        value = entry[token]
        return float(getattr(value, "logprob", value))
    return float(entry)
