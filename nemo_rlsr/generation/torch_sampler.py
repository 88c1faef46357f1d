"""Our own KV-cache sampler over the trainer's megatron GPTModel (CPU and GPU, TP>=1, PP=1).

It runs the trainer's module itself, so a refit costs nothing: `update_weights` has nothing to copy.
The KV cache is megatron-core's static inference context; decoding feeds one token per step.
Sampling runs on every TP rank with identically seeded generators, so all ranks draw the same
tokens from the (gathered) full-vocabulary logits.
"""

from __future__ import annotations

import torch

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.models.gpt import mask_padded_vocab


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top token)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class TorchRolloutEngine:
    def __init__(self, module, pad_id: int, eos_id: int, vocab_size: int) -> None:
        if not (module.pre_process and module.post_process):
            raise ValueError(
                "the torch rollout engine needs the whole model on each rank (pipeline_parallel=1)"
            )
        self.module = module
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size

    def update_weights(self) -> None:
        """Nothing to copy: the engine samples from the trainer's own module."""

    def sleep(self) -> None:
        """Nothing is held between calls: the KV cache lives only inside `generate`."""

    def wake(self) -> None:
        """See `sleep`."""

    def _forward(self, ids, valid_keys, context) -> torch.Tensor:
        from nemo_rlsr.models.policy import attention_mask

        start = context.sequence_len_offset
        length = ids.shape[1]
        positions = torch.arange(start, start + length, device=ids.device).expand_as(ids)
        if start == 0:
            mask = attention_mask(valid_keys)
        else:
            mask = ~valid_keys[:, None, None, :].bool()
        logits = self.module(
            ids, positions, mask, inference_context=context, runtime_gather_output=True
        )
        context.sequence_len_offset += length
        return logits[:, -1].float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device = next(self.module.parameters()).device
        n, prompt_len = len(prompts), max(len(p) for p in prompts)
        total = prompt_len + params.max_new_tokens
        ids = torch.full((n, total), self.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(n, total, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt, device=device)
            valid[row, prompt_len - len(prompt) : prompt_len] = True
        response_mask = torch.zeros(n, total, dtype=torch.float32, device=device)
        engine_logprobs = torch.zeros(n, total, dtype=torch.float32, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        generator = torch.Generator(device=device).manual_seed(seed)

        was_training = self.module.training
        self.module.eval()
        context = StaticInferenceContext(max_batch_size=n, max_sequence_length=total)
        try:
            logits = self._forward(ids[:, :prompt_len], valid[:, :prompt_len], context)
            for step in range(params.max_new_tokens):
                column = prompt_len + step
                logits = mask_padded_vocab(logits, self.vocab_size, gathered=True) / params.temperature
                logprobs = torch.log_softmax(logits, dim=-1)
                if params.greedy:
                    token = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(top_p_filter(logits, params.top_p), dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                active = ~finished
                ids[:, column] = torch.where(active, token, self.pad_id)
                valid[:, column] = active
                response_mask[:, column - 1] = active.float()
                engine_logprobs[:, column - 1] = torch.where(
                    active, logprobs.gather(1, token[:, None]).squeeze(1), 0.0
                )
                if params.stop_on_eos:
                    finished |= active & (token == self.eos_id)
                if bool(finished.all()) or step + 1 == params.max_new_tokens:
                    break
                logits = self._forward(ids[:, column : column + 1], valid[:, : column + 1], context)
        finally:
            self.module.train(was_training)

        response_ids = [
            ids[row, prompt_len:][valid[row, prompt_len:]].tolist() for row in range(n)
        ]
        return RolloutBatch(ids, valid, response_mask, engine_logprobs, response_ids, ~finished)
