"""Our own KV-cache sampler over the trainer's megatron GPTModel (CPU and GPU, TP>=1, PP=1).

It runs the trainer's module itself, so a refit costs nothing: `update_weights` has nothing to copy.
The KV cache is megatron-core's static inference context; decoding feeds one token per step.
Sampling runs on every TP rank with identically seeded generators, so all ranks draw the same
tokens from the (gathered) full-vocabulary logits.

* n samples per prompt: each distinct prompt is prefilled once, then its cached keys/values are
  copied into the n rows of its samples (`share_prompt_kv=False` prefills every row, for tests).
* Seeds: every sample has its own generator, seeded from its request's seed and its index within
  the request, and draws one uniform per step: a request's tokens do not depend on the other
  requests in the batch, up to the float differences that another left-pad width makes.
* Stop strings (`params.stop`, needs `detokenize`): after each step every active row's response is
  decoded; once it contains a stop string the row ends with the token that completed it (that token
  is in `response_ids`, `response_mask` and `valid`, like an EOS token; `truncated` is False).
* Finished rows (EOS, stop string) leave the batch: their cache rows are dropped and later steps
  run only the live rows (GRPO responses end at very different lengths).
* Expert parallelism: MoE layers exchange tokens between ranks that sample different prompts, so
  the ranks of `lockstep_group()` run the same prefill and decode steps, with the same shapes (the
  largest prompt length and row counts of the group), until none has a row left; missing rows are
  filler copies of cache row 0 whose outputs are never read (generation/lockstep.py). One rank (or
  no MoE collective across prompts) runs no collective at all.
* Not built: continuous refill (a waiting request taking a finished row's slot). The static
  context keeps one sequence offset for the whole batch, so a new request cannot join mid-way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.lockstep import group_max, lockstep_group, pad_rows
from nemo_rlsr.generation.sampling import next_tokens, request_seeds, row_generators, stop_string_end
from nemo_rlsr.models.sequence_parallel import sequence_parallel_off


@contextmanager
def generation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, with sequence and context parallelism switched off: one token per step cannot be
    split over TP or CP (models/sequence_parallel.py, models/context_parallel.py), so every CP rank
    of a DP rank samples the same rollouts. Everything is restored on exit."""
    from nemo_rlsr.models.context_parallel import context_parallel_off  # imports megatron

    was_training = module.training
    module.eval()
    try:
        with sequence_parallel_off(module), context_parallel_off(module):
            yield
    finally:
        module.train(was_training)


def select_kv_rows(context, rows: torch.Tensor) -> None:
    """Row i of a static context's KV cache becomes its old row `rows[i]`: repeated indices copy a
    prompt's cache into its n samples, a subset drops finished rows."""
    for layer, (keys, values) in context.key_value_memory_dict.items():
        # [sequence, batch, ...]: the batch is dim 1
        context.key_value_memory_dict[layer] = (keys.index_select(1, rows), values.index_select(1, rows))
    context.max_batch_size = len(rows)


class TorchRolloutEngine:
    def __init__(self, module, pad_id: int, eos_id: int, vocab_size: int,
                 detokenize: Callable[[list[int]], str] | None = None, share_prompt_kv: bool = True) -> None:
        if not (module.pre_process and module.post_process):
            raise ValueError(
                "the torch rollout engine needs the whole model on each rank (pipeline_parallel=1)"
            )
        self.module = module
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.detokenize = detokenize
        self.share_prompt_kv = share_prompt_kv

    def update_weights(self) -> dict[str, float]:
        """Nothing to copy: the engine samples from the trainer's own module."""
        return {}

    def sleep(self) -> None:
        """Nothing is held between calls: the KV cache lives only inside `generate`."""

    def wake(self) -> None:
        """See `sleep`."""

    def close(self) -> None:
        """Nothing to release: the engine runs the trainer's own module."""

    def _forward(self, ids, valid_keys, context) -> torch.Tensor:
        from nemo_rlsr.models.policy import attention_mask

        start = context.sequence_len_offset
        length = ids.shape[1]
        positions = torch.arange(start, start + length, device=ids.device).expand_as(ids)
        if start == 0:
            mask = attention_mask(valid_keys)
        else:
            mask = ~valid_keys[:, None, None, :].bool()
        logits = self.module(ids, positions, mask, inference_context=context, runtime_gather_output=True)
        context.sequence_len_offset += length
        return logits[:, -1].float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need the engine's detokenize callback")
        device = next(self.module.parameters()).device
        seeds = request_seeds(seed, len(prompts))
        n_samples = params.n
        rows = [p for p in prompts for _ in range(n_samples)]
        share = self.share_prompt_kv and n_samples > 1
        n, prompt_len = len(rows), max(len(p) for p in prompts)
        width, prefill_width = n, len(prompts) if share else n  # cache rows: all live, no fillers
        group = lockstep_group()
        if group is not None:  # every rank of the group runs the same shapes (generation/lockstep.py)
            width, prefill_width, prompt_len = group_max([width, prefill_width, prompt_len], group, device)
        total = prompt_len + params.max_new_tokens
        ids = torch.full((n, total), self.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(n, total, dtype=torch.bool, device=device)
        for row, prompt in enumerate(rows):
            ids[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt, device=device)
            valid[row, prompt_len - len(prompt) : prompt_len] = True
        response_mask = torch.zeros(n, total, dtype=torch.float32, device=device)
        engine_logprobs = torch.zeros(n, total, dtype=torch.float32, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        generators = row_generators(seeds, n_samples, device)
        responses: list[list[int]] = [[] for _ in range(n)]

        context = StaticInferenceContext(max_batch_size=prefill_width, max_sequence_length=total)
        with generation_mode(self.module):
            # share: prefill each distinct prompt once, then give its n samples copies of its cache.
            # Filler rows (lockstep only) repeat row 0; their outputs are never read.
            first = pad_rows(torch.arange(0, n, n_samples if share else 1, device=device), prefill_width)
            logits = self._forward(ids[first, :prompt_len], valid[first, :prompt_len], context)
            cache_rows = pad_rows(torch.arange(n, device=device), width)  # the row whose sequence each cache row runs
            if share:
                select_kv_rows(context, cache_rows // n_samples)
                logits = logits[cache_rows // n_samples]
            live = torch.arange(n, device=device)  # unfinished rows: the first len(live) cache rows
            for step in range(params.max_new_tokens):
                column = prompt_len + step
                done = torch.zeros(0, dtype=torch.bool, device=device)
                if len(live):  # in lockstep a rank with no rows left still steps, with fillers only
                    rows = live.tolist()
                    token, token_logprob = next_tokens(logits[: len(rows)], params, self.vocab_size,
                                                       [generators[r] for r in rows])
                    ids[live, column] = token
                    valid[live, column] = True
                    response_mask[live, column - 1] = 1.0
                    engine_logprobs[live, column - 1] = token_logprob
                    for row, value in zip(rows, token.tolist()):
                        responses[row].append(value)
                    done = token == self.eos_id if params.stop_on_eos else torch.zeros_like(token, dtype=torch.bool)
                    if params.stop:
                        done |= self._stopped([responses[r] for r in rows], params.stop)
                    finished[live] = done
                keep = (~done).nonzero().flatten()
                # lockstep: one all-reduce per step; the group goes on while any rank has rows left
                width = len(keep) if group is None else group_max([len(keep)], group, device)[0]
                if width == 0 or step + 1 == params.max_new_tokens:
                    break
                if len(keep) < len(live) or width < len(cache_rows):  # drop finished rows (and fillers)
                    kept = pad_rows(keep, width)
                    select_kv_rows(context, kept)
                    cache_rows, live = cache_rows[kept], live[keep]
                logits = self._forward(ids[cache_rows, column : column + 1], valid[cache_rows, : column + 1], context)
        return RolloutBatch(ids, valid, response_mask, engine_logprobs, responses, ~finished)

    def _stopped(self, responses: list[list[int]], stops) -> torch.Tensor:
        return torch.tensor([stop_string_end(self.detokenize(r), stops) is not None for r in responses],
                            device=next(self.module.parameters()).device)
