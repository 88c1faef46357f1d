"""Our own KV-cache sampler over the trainer's megatron GPTModel (CPU and GPU, TP>=1, PP=1).

It runs the trainer's module itself, so a refit costs nothing: `update_weights` has nothing to copy.
The KV cache is generation/kv_cache.py's (rotated keys, SDPA; megatron's static inference context
for MLA); decoding feeds one token per step. On the CPU, generation runs outside the CPU-compat
layer's function mode (distributed/cpu_compat.py `device_rewrite_suspended`): no op of the decode
path needs it, and it would see every one.
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
  filler copies of cache row 0 whose outputs are never read. That is the `Lockstep` strategy of
  generation/lockstep.py; without such a group the sampler decodes `Alone`: no collective, no filler.
* Not built: continuous refill (a waiting request taking a finished row's slot). The static
  context keeps one sequence offset for the whole batch, so a new request cannot join mid-way.

Where things are: `TorchRolloutEngine.generate` is the decode loop; `DecodeState` holds one call's
rows, their KV cache and the stop bookkeeping; the strategy decides the shapes of each forward;
generation/sampling.py is the sampling rule (shared with megatron-core's engine).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from nemo_rlsr.distributed.cpu_compat import device_rewrite_suspended
from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.kv_cache import new_cache
from nemo_rlsr.generation.lockstep import Alone, Lockstep, decode_strategy
from nemo_rlsr.generation.sampling import next_tokens, request_seeds, row_generators, stop_string_end
from nemo_rlsr.models.sequence_parallel import sequence_parallel_off

# (token ids [rows, columns], valid keys [rows, columns so far], KV context) -> next-token logits [rows, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def explicit_mask_attention(module: torch.nn.Module):
    """The sampler's forwards carry their own mask (left-padded prompts; megatron's local attention
    applies it whatever the mask type, which it does not use): a model built for the THD layout runs
    `arbitrary` attention while sampling (models/spec.attention_mask_type)."""
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_rlsr.models.spec import attention_mask_type

    return attention_mask_type(module, AttnMaskType.arbitrary)


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


@contextmanager
def direct_linears(module: torch.nn.Module) -> Iterator[None]:
    """megatron's TP linears (local spec) multiply without their autograd function, whose
    bookkeeping under `no_grad` is per-token overhead. The product is the function's own,
    `torch.matmul(input, weight.t())` then `+ bias` (tensor_parallel/layers.py `LinearWithFrozenWeight`
    and `LinearWithGradAccumulationAndAsyncCommunication`, core_v0.16.1 and core_v0.19.0), so logits
    are bit for bit the trainer's. Valid only with sequence parallelism off, which `generation_mode`
    ensures (the function would all-gather the input first). TE's linears are other classes and
    stay as they are."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    linears = [m for m in module.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    for linear in linears:
        linear._forward_impl = _matmul
    try:
        yield
    finally:
        for linear in linears:
            del linear._forward_impl


def _matmul(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            sequence_parallel: bool = False, **_) -> torch.Tensor:
    if sequence_parallel:
        raise RuntimeError("direct_linears needs sequence parallelism off (generation_mode)")
    output = torch.matmul(input, weight.t())
    return output + bias if bias is not None else output


class DecodeState:
    """One `generate` call's rows in the trainer's layout, the KV cache that runs them, and which
    have finished. Four index spaces:

    * sequence rows 0..N-1 (N = prompts x n, a prompt's samples contiguous) index the outputs
      (`ids`, `valid`, `response_mask`, `engine_logprobs`, `finished`, `responses`) and `generators`;
    * prefill rows: one per distinct prompt when its n samples share its cache, else one per row;
    * cache rows, the batch dimension of the KV cache and of each forward: cache row i runs sequence
      row `cache_rows[i]` (a filler repeats cache row 0's);
    * `live`: the unfinished sequence rows; the first len(live) cache rows run them, in that order.

    Columns: `prompt_len` (the longest prompt of the strategy's group) left-padded prompt columns,
    then one column per new token; `column` is where the next token goes.
    """

    def __init__(self, engine: "TorchRolloutEngine", prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int], strategy: Alone | Lockstep, device: torch.device) -> None:
        self.engine, self.params, self.strategy = engine, params, strategy
        self.share = engine.share_prompt_kv and params.n > 1
        rows = [p for p in prompts for _ in range(params.n)]
        n = len(rows)
        own_sizes = [n, len(prompts) if self.share else n, max(len(p) for p in prompts)]
        self.width, self.prefill_width, self.prompt_len = strategy.agree(own_sizes)
        total = self.prompt_len + params.max_new_tokens
        self.ids = torch.full((n, total), engine.pad_id, dtype=torch.long, device=device)
        self.valid = torch.zeros(n, total, dtype=torch.bool, device=device)
        for row, prompt in enumerate(rows):
            self.ids[row, self.prompt_len - len(prompt) : self.prompt_len] = torch.tensor(prompt, device=device)
            self.valid[row, self.prompt_len - len(prompt) : self.prompt_len] = True
        self.response_mask = torch.zeros(n, total, dtype=torch.float32, device=device)
        self.engine_logprobs = torch.zeros(n, total, dtype=torch.float32, device=device)
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)
        self.responses: list[list[int]] = [[] for _ in range(n)]
        self.generators = row_generators(seeds, params.n, device)
        self.live = torch.arange(n, device=device)
        self.cache_rows = self.live  # until `prefill` pads them to the agreed width
        self.column = self.prompt_len
        self.cache = new_cache(engine.module, self.prefill_width, total)

    @property
    def full(self) -> bool:
        """Every row has `max_new_tokens` columns of response."""
        return self.column == self.ids.shape[1]

    def prefill(self, forward: Forward) -> torch.Tensor:
        """Run the prompts (each distinct one once when shared, then its cache copied into its
        samples' rows); returns each cache row's next-token logits."""
        n, samples = len(self.responses), self.params.n
        first = self.strategy.fill(torch.arange(0, n, samples if self.share else 1, device=self.live.device),
                                   self.prefill_width)
        logits = forward(self.ids[first, : self.prompt_len], self.valid[first, : self.prompt_len], self.cache)
        self.cache_rows = self.strategy.fill(self.live, self.width)
        if self.share:
            self.cache.select_rows(self.cache_rows // samples)
            logits = logits[self.cache_rows // samples]
        return logits

    def step(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample one token for each live row from its cache row's `logits`, record it, and mark the
        rows it ends (EOS, stop string); returns the positions in `live` of the rows that go on.
        With no live row (a lockstep rank whose rows have all ended) nothing is sampled."""
        done = torch.zeros(0, dtype=torch.bool, device=logits.device)
        if len(self.live):
            rows = self.live.tolist()
            token, token_logprob = next_tokens(logits[: len(rows)], self.params, self.engine.vocab_size,
                                               [self.generators[r] for r in rows])
            self.ids[self.live, self.column] = token
            self.valid[self.live, self.column] = True
            # column t describes the token at t+1 (aligned with TokenBatch.targets)
            self.response_mask[self.live, self.column - 1] = 1.0
            self.engine_logprobs[self.live, self.column - 1] = token_logprob
            for row, value in zip(rows, token.tolist()):
                self.responses[row].append(value)
            done = self.engine.ends(token, [self.responses[r] for r in rows], self.params)
            self.finished[self.live] = done
        self.column += 1
        return (~done).nonzero().flatten()

    def compact(self, keep: torch.Tensor, width: int) -> None:
        """Keep the live rows at positions `keep`, in `width` cache rows (the strategy's fillers
        after them); drop the rest of the cache."""
        if len(keep) < len(self.live) or width < len(self.cache_rows):
            kept = self.strategy.fill(keep, width)
            self.cache.select_rows(kept)
            self.cache_rows, self.live = self.cache_rows[kept], self.live[keep]

    def forward(self, forward: Forward) -> torch.Tensor:
        """Feed each cache row's newest token; returns the next-token logits."""
        newest = self.column - 1
        return forward(self.ids[self.cache_rows, newest : newest + 1], self.valid[self.cache_rows, : newest + 1],
                       self.cache)

    def batch(self) -> RolloutBatch:
        return RolloutBatch(self.ids, self.valid, self.response_mask, self.engine_logprobs, self.responses,
                            ~self.finished)


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

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need the engine's detokenize callback")
        device = next(self.module.parameters()).device
        strategy = decode_strategy(device)
        state = DecodeState(self, prompts, params, request_seeds(seed, len(prompts)), strategy, device)
        with (generation_mode(self.module), explicit_mask_attention(self.module), direct_linears(self.module),
              state.cache.attached(self.module), device_rewrite_suspended()):
            logits = state.prefill(self._forward)
            while True:
                keep = state.step(logits)
                width = strategy.agree([len(keep)])[0]  # in lockstep: while any rank of the group has rows
                if width == 0 or state.full:
                    break
                state.compact(keep, width)
                logits = state.forward(self._forward)
        return state.batch()

    def ends(self, tokens: torch.Tensor, responses: list[list[int]], params: SamplingParams) -> torch.Tensor:
        """Which rows a step's `tokens` end: EOS (with `stop_on_eos`), or a response that now
        contains a stop string."""
        done = tokens == self.eos_id if params.stop_on_eos else torch.zeros_like(tokens, dtype=torch.bool)
        if params.stop:
            done |= torch.tensor([stop_string_end(self.detokenize(r), params.stop) is not None for r in responses],
                                 device=tokens.device)
        return done

    def _forward(self, ids, valid_keys, cache) -> torch.Tensor:
        start = cache.offset
        length = ids.shape[1]
        positions = torch.arange(start, start + length, device=ids.device).expand_as(ids)
        logits = self.module(ids, positions, decode_mask(valid_keys, length), runtime_gather_output=True,
                             **cache.forward_kwargs())
        cache.advance(length)
        return logits[:, -1].float()


def decode_mask(valid_keys: torch.Tensor, queries: int) -> torch.Tensor:
    """Megatron's boolean mask (True = not attended) of the last `queries` positions over the keys
    `valid_keys` [rows, keys]: pad keys and future keys are masked, except that every query sees
    itself: a left-pad query would otherwise attend to nothing (SDPA's output for such a row is
    not defined the same way everywhere, and a NaN there would reach real tokens through 0 x NaN).
    Pad queries' outputs are never read: pad keys are masked for every later query."""
    keys = valid_keys.shape[1]
    query_pos = torch.arange(keys - queries, keys, device=valid_keys.device)[:, None]
    key_pos = torch.arange(keys, device=valid_keys.device)[None, :]
    masked = (key_pos > query_pos)[None, None] | ~valid_keys[:, None, None, :].bool()
    return masked & (key_pos != query_pos)[None, None]
