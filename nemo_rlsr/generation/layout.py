"""Engine outputs (token ids + logprobs per sample) -> `RolloutBatch` in the trainer's layout.

Engines that do not run on our tensors (TensorRT-LLM, megatron-core's inference engine) return
lists of token ids and per-token logprobs; this puts them into the same
`[left pad | prompt | response | right pad]` rows that our torch sampler builds in place, so the
trainer's side never knows which engine ran.
"""

from __future__ import annotations

import torch

from nemo_rlsr.generation.interface import RolloutBatch


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                  finished: list[bool], pad_id: int, max_new_tokens: int,
                  device: torch.device | str = "cpu") -> RolloutBatch:
    """`prompts[i]` is row i's prompt (already repeated n times for n samples), `responses[i]` its
    sampled tokens (including a final EOS / stop token), `logprobs[i]` one logprob per token,
    `finished[i]` whether it ended on EOS or a stop string (False: cut by max_new_tokens)."""
    if not len(prompts) == len(responses) == len(logprobs) == len(finished):
        raise ValueError("prompts, responses, logprobs and finished must have one entry per row")
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    n = len(prompts)
    ids = torch.full((n, total), pad_id, dtype=torch.long)
    valid = torch.zeros(n, total, dtype=torch.bool)
    response_mask = torch.zeros(n, total, dtype=torch.float32)
    engine_logprobs = torch.zeros(n, total, dtype=torch.float32)
    for row, (prompt, response, lps) in enumerate(zip(prompts, responses, logprobs)):
        if len(lps) != len(response):
            raise ValueError(f"row {row}: {len(response)} tokens but {len(lps)} logprobs")
        if len(response) > max_new_tokens:
            raise ValueError(f"row {row}: {len(response)} tokens > max_new_tokens={max_new_tokens}")
        start, end = prompt_len - len(prompt), prompt_len + len(response)
        ids[row, start:end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        valid[row, start:end] = True
        # column t describes the token at t+1 (aligned with TokenBatch.targets)
        response_mask[row, prompt_len - 1 : end - 1] = 1.0
        engine_logprobs[row, prompt_len - 1 : end - 1] = torch.tensor(lps, dtype=torch.float32)
    return RolloutBatch(ids.to(device), valid.to(device), response_mask.to(device), engine_logprobs.to(device),
                        [list(r) for r in responses], torch.tensor([not f for f in finished], device=device))


def concat_rollouts(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """The rows of `batches` in order, as one batch in the same layout (a step generated in chunks,
    reward.overlap_chunks). Every batch has `max_new_tokens` columns after its own longest prompt;
    narrower ones get more left padding, so each row's response starts in the same column as in a
    batch generated in one call."""
    width = max(b.input_ids.shape[1] for b in batches)

    def left_pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    return RolloutBatch(
        torch.cat([left_pad(b.input_ids, pad_id) for b in batches]),
        torch.cat([left_pad(b.valid, False) for b in batches]),
        torch.cat([left_pad(b.response_mask, 0.0) for b in batches]),
        torch.cat([left_pad(b.engine_logprobs, 0.0) for b in batches]),
        [r for b in batches for r in b.response_ids],
        torch.cat([b.truncated for b in batches]),
    )
