"""megatron-core's own inference engine over the trainer's module (no refit copy).

Same weights as the trainer: the engine wraps `policy.module`, so `update_weights` has nothing to
do. It runs megatron-core's static batching path: `TextGenerationController(wrapper, tokenizer)` +
`StaticInferenceEngine(controller, max_batch_size, legacy=True)` on pre-tokenised `InferenceRequest`s,
read in each tag's megatron/core/inference/ (core_v0.16.1, core_v0.17.1, core_v0.18.2, core_v0.19.0;
the 0.19.2 wheel's engine and controller files are the same as core_v0.19.0's). The wrapper's
constructor moved between releases (InferenceWrapperConfig up to 0.16, the KV-cache context from
0.17): `static_inference_wrapper` in compat/megatron.py builds it for the installed one.

What megatron's static path does on its own, and what this adapter does about it (the same in all
four releases, text_generation_controllers/text_generation_controller.py and engines/static_engine.py):

* It stops a row at `tokenizer.eod` and leaves that token out of `generated_tokens`, and it reads
  `SamplingParams.termination_id` nowhere on this path (only the attribute `no_early_termination`).
  We set `no_early_termination` when `stop_on_eos` is off, and rebuild each response from the tokens
  we sampled ourselves (`response_from_samples`): EOS is kept, the row counts as finished.
* It samples in `TextGenerationController.sample_from_logits` with one generator seeded from
  `inference_sampling_seed` (42 unless configured), samples padded-vocabulary ids (it clamps to the
  padded size only), asserts on top-k together with top-p, and returns logprobs of the raw logits.
  `_RowSamplingController` overrides that one method with our own rule (sampling.next_tokens: the
  torch sampler's, so the same seeds give the same tokens): per-sample generators from the request
  seeds, padded ids masked, top-k then top-p, and the logprob of the temperature-scaled distribution
  the trainer recomputes. The engine's own logprobs are not requested (that also spares it the prompt
  logits).
* `generate_using_legacy_static_engine` reseeds the global torch RNG (`torch.random.manual_seed`), and
  from 0.18 `StaticInferenceEngine.__init__` sets the process-wide `InferenceMode` flag that
  GPTModel.forward reads and nothing clears: both are restored after each call (`_restored_state`;
  the flag by compat/megatron.py's `restored_inference_mode`).
* The KV cache (`StaticInferenceContext`) holds at most `max_batch_size` rows, which build_engine sets
  to this rank's rows per step; a call with more rows runs in turns (megatron's scheduler).

tests/test_megatron_engine.py runs all of this on the CPU (cpu_compat) against megatron-core 0.16.1,
and on CUDA where there is a GPU. It also passed, by hand and not in CI, with the 0.17.1, 0.18.2 and
0.19.2 wheels' `megatron` first on PYTHONPATH (Python 3.11; the two MoE paged-stash modules that
import triton at import time replaced by empty modules, nothing here uses them); the start-up check
(generation/factory.engine_problems) still refuses the engine without CUDA, for which it is built.
Not run: the Transformer Engine layer spec (its attention takes our explicit masks, models/spec.py,
while megatron's static engine passes none during generation).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.layout import rollout_batch
from nemo_rlsr.generation.sampling import next_tokens, request_seeds, row_generators
from nemo_rlsr.generation.torch_sampler import generation_mode


class _IdTokenizer:
    """The parts of a megatron tokenizer the text-generation controller touches for id prompts."""

    def __init__(self, eos_id: int, pad_id: int) -> None:
        self.eod = eos_id
        self.pad = pad_id
        self.bos = None

    def detokenize(self, ids, *args, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError("prompts are given as token ids")


class RowSampler:
    """Our sampling for megatron's static loop, one generator per request id, and a record of what
    each request sampled. Each step the loop hands us the last-position logits of every row of the
    static batch; rows whose prompt is longer than the step's position have not started, and their
    sample is thrown away by the loop, so they are not sampled (no uniform drawn): a request's
    tokens depend on its seed only, not on the other prompts' lengths."""

    def __init__(self, params: SamplingParams, vocab_size: int, generators: dict[str, torch.Generator]) -> None:
        self.params, self.vocab_size, self.generators = params, vocab_size, generators
        self.tokens: dict[str, list[int]] = {key: [] for key in generators}
        self.logprobs: dict[str, list[float]] = {key: [] for key in generators}

    def step(self, request_ids: Sequence[str], logits: torch.Tensor, started: torch.Tensor | None) -> torch.Tensor:
        tokens = torch.zeros(len(request_ids), dtype=torch.long, device=logits.device)
        rows = torch.arange(len(request_ids), device=logits.device)
        if started is not None:
            rows = rows[started.bool()]
        if len(rows) == 0:
            return tokens
        keys = [request_ids[i] for i in rows.tolist()]
        token, logprob = next_tokens(logits[rows], self.params, self.vocab_size, [self.generators[k] for k in keys])
        tokens[rows] = token
        for key, value, lp in zip(keys, token.tolist(), logprob.tolist()):
            self.tokens[key].append(value)
            self.logprobs[key].append(lp)
        return tokens


def _row_sampling_controller(wrapper, tokenizer, sampler: RowSampler):
    """megatron's TextGenerationController with `sample_from_logits` (same signature in 0.16-0.19:
    last-position logits [batch, padded vocab], then `generation_started` [batch]) routed to `sampler`."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class _RowSamplingController(TextGenerationController):
        def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
            self.batch_ids = [str(key) for key in active_requests]  # the static batch's row order
            return super().generate_all_output_tokens_static_batch(active_requests, active_streams)

        def sample_from_logits(self, last_token_logits, sampling_params=None, vocab_size=None,
                               generation_started=None, **kwargs):
            return sampler.step(self.batch_ids, last_token_logits, generation_started)

    return _RowSamplingController(wrapper, tokenizer)


def response_from_samples(sampled: list[int], logprobs: list[float], engine_tokens: list[int], eos_id: int,
                          stop_on_eos: bool, max_new_tokens: int) -> tuple[list[int], list[float], bool]:
    """(response, its logprobs, finished) from what a request sampled, cut at max_new_tokens and, when
    stop_on_eos, just after the first EOS (kept: it is trained, and marks the row finished). The
    engine's `generated_tokens` (EOS dropped) must be the response or the response less its EOS;
    anything else means the engine and our record disagree, which is refused rather than trained on."""
    response = sampled[:max_new_tokens]
    finished = stop_on_eos and eos_id in response
    if finished:
        response = response[: response.index(eos_id) + 1]
    expected = response[:-1] if finished else response
    if engine_tokens not in (response, expected):
        raise RuntimeError(f"megatron's engine returned {engine_tokens}, but the sampled tokens give {response}")
    return response, logprobs[: len(response)], finished


@contextmanager
def _restored_state() -> Iterator[None]:
    """The global torch RNG (CPU and this GPU) and megatron's InferenceMode flag (0.18+) as they were."""
    from nemo_rlsr.compat.megatron import restored_inference_mode

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with restored_inference_mode(), torch.random.fork_rng(devices=devices):
        yield


class MegatronRolloutEngine:
    def __init__(self, module, pad_id: int, eos_id: int, vocab_size: int, max_batch_size: int,
                 max_sequence_length: int) -> None:
        """`max_batch_size`: KV-cache rows (this rank's rows per step); `vocab_size`: the tokenizer's,
        below the model's padded vocabulary."""
        self.module, self.pad_id, self.eos_id, self.vocab_size = module, pad_id, eos_id, vocab_size
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length

    def update_weights(self) -> dict[str, float]:
        """Nothing to copy: the engine runs the trainer's own module."""
        return {}

    def sleep(self) -> None:
        """The KV cache is built per `generate` call and dropped after it."""

    def wake(self) -> None:
        """See `sleep`."""

    def close(self) -> None:
        """Nothing to release: the engine runs the trainer's own module."""

    def _engine(self, rows: int, sampler: RowSampler):
        from megatron.core.inference.engines import StaticInferenceEngine

        from nemo_rlsr.compat.megatron import static_inference_wrapper

        cache_rows = min(rows, self.max_batch_size)
        wrapper = static_inference_wrapper(self.module, cache_rows, self.max_sequence_length)
        controller = _row_sampling_controller(wrapper, _IdTokenizer(self.eos_id, self.pad_id), sampler)
        return StaticInferenceEngine(controller, max_batch_size=cache_rows, legacy=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        from megatron.core.inference.inference_request import InferenceRequest
        from megatron.core.inference.sampling_params import SamplingParams as MCoreSamplingParams

        if params.stop:
            raise ValueError("stop strings are built for the torch engine only")
        device = next(self.module.parameters()).device
        rows = [p for p in prompts for _ in range(params.n)]
        keys = [str(i) for i in range(len(rows))]
        generators = row_generators(request_seeds(seed, len(prompts)), params.n, device)
        sampler = RowSampler(params, self.vocab_size, dict(zip(keys, generators)))
        # sampling happens in RowSampler; megatron's own temperature/top-k/top-p/logprobs stay unused
        mcore_params = MCoreSamplingParams(num_tokens_to_generate=params.max_new_tokens, return_log_probs=False)
        if not params.stop_on_eos:
            mcore_params.add_attributes({"no_early_termination": True})
        requests = [InferenceRequest(request_id=key, prompt="", prompt_tokens=list(p), sampling_params=mcore_params)
                    for key, p in zip(keys, rows)]
        with _restored_state(), generation_mode(self.module):  # static batching refuses SP
            results = {str(r.request_id): r for r in self._engine(len(rows), sampler).generate(
                inference_requests=requests)}
        responses, logprobs, finished = zip(*(
            response_from_samples(sampler.tokens[key], sampler.logprobs[key],
                                  [int(t) for t in results[key].generated_tokens], self.eos_id,
                                  params.stop_on_eos, params.max_new_tokens) for key in keys))
        return rollout_batch(rows, list(responses), list(logprobs), list(finished), self.pad_id,
                             params.max_new_tokens, device)
