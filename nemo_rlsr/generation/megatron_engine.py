"""megatron-core's own inference engine over the trainer's module (GPU only; no refit copy).

Same weights as the trainer: the engine wraps `policy.module`, so `update_weights` has nothing to
do. The API moved between releases (DESIGN.md), hence one small switch:

* 0.16 (`megatron.core.__version__` 0.16.x, read in the installed source):
  `GPTInferenceWrapper(model, InferenceWrapperConfig(hidden_size, params_dtype,
  inference_batch_times_seqlen_threshold, padded_vocab_size, inference_max_requests,
  inference_max_seq_length))`.
* 0.17+ (read in Megatron-LM's main-line source of the 0.19 series): `InferenceWrapperConfig` is
  gone and the wrapper takes the KV-cache context directly:
  `GPTInferenceWrapper(model, StaticInferenceContext(max_batch_size, max_sequence_length))`.

Both then run `TextGenerationController(wrapper, tokenizer)` + `StaticInferenceEngine(controller,
max_batch_size, random_seed, legacy=True)` on pre-tokenised `InferenceRequest`s with
`SamplingParams(return_log_probs=True, termination_id=eos)`. The tokenizer below only supplies ids
(`eod`, `detokenize` for the engine's text fields); responses are returned as ids. Not exercised
on the CPU machines (megatron-core's engine needs CUDA): tests/test_rollout_engines.py compares it
with the torch sampler on a GPU.
"""

from __future__ import annotations

from typing import Sequence

import torch

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.layout import rollout_batch
from nemo_rlsr.generation.sampling import request_seeds
from nemo_rlsr.models.sequence_parallel import sequence_parallel_off


def mcore_version() -> tuple[int, int]:
    from megatron.core import package_info

    major, minor = package_info.__version__.split(".")[:2]
    return int(major), int(minor)


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


class MegatronRolloutEngine:
    def __init__(self, module, pad_id: int, eos_id: int, vocab_size: int, max_batch_size: int,
                 max_sequence_length: int) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.engine=megatron needs CUDA: megatron-core's inference engine has no CPU "
                               "path; use rollout.engine=torch")
        self.module, self.pad_id, self.eos_id, self.vocab_size = module, pad_id, eos_id, vocab_size
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length

    def update_weights(self) -> dict[str, float]:
        """Nothing to copy: the engine runs the trainer's own module."""
        return {}

    def sleep(self) -> None:
        """The KV cache is built per `generate` call and dropped after it."""

    def wake(self) -> None:
        """See `sleep`."""

    def _engine(self, seed: int):
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        if mcore_version() < (0, 17):
            from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
                InferenceWrapperConfig,
            )

            config = InferenceWrapperConfig(
                hidden_size=self.module.config.hidden_size, params_dtype=self.module.config.params_dtype,
                inference_batch_times_seqlen_threshold=-1, padded_vocab_size=self.module.vocab_size,
                inference_max_requests=self.max_batch_size, inference_max_seq_length=self.max_sequence_length)
            wrapper = GPTInferenceWrapper(self.module, config)
        else:
            from megatron.core.inference.contexts import StaticInferenceContext

            wrapper = GPTInferenceWrapper(self.module, StaticInferenceContext(self.max_batch_size,
                                                                              self.max_sequence_length))
        controller = TextGenerationController(wrapper, _IdTokenizer(self.eos_id, self.pad_id))
        return StaticInferenceEngine(controller, max_batch_size=self.max_batch_size, random_seed=seed, legacy=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        from megatron.core.inference.inference_request import InferenceRequest
        from megatron.core.inference.sampling_params import SamplingParams as MCoreSamplingParams

        if params.stop:
            raise ValueError("stop strings are built for the torch engine only")
        # megatron's engine seeds one generator per call, not per request: per-request seeds are not
        # honoured (documented limitation); the first prompt's derived seed seeds the call.
        call_seed = request_seeds(seed, len(prompts))[0] % (2**31)
        sampling = MCoreSamplingParams(
            temperature=params.temperature, top_k=1 if params.greedy else params.top_k,
            top_p=0.0 if params.greedy or params.top_p >= 1.0 else params.top_p,
            return_log_probs=True, num_tokens_to_generate=params.max_new_tokens,
            termination_id=self.eos_id if params.stop_on_eos else -1)
        rows = [p for p in prompts for _ in range(params.n)]
        requests = [InferenceRequest(request_id=str(i), prompt="", prompt_tokens=list(p), sampling_params=sampling)
                    for i, p in enumerate(rows)]
        was_training = self.module.training
        self.module.eval()
        try:
            with sequence_parallel_off(self.module):  # its static batching refuses SP (models/sequence_parallel.py)
                results = self._engine(call_seed).generate(inference_requests=requests)
        finally:
            self.module.train(was_training)
        by_id = {r.request_id: r for r in results}
        responses, logprobs, finished = [], [], []
        for i in range(len(rows)):
            result = by_id[str(i)]
            tokens = [int(t) for t in result.generated_tokens][: params.max_new_tokens]
            responses.append(tokens)
            logprobs.append([float(x) for x in result.generated_log_probs][: len(tokens)])
            finished.append(params.stop_on_eos and bool(tokens) and tokens[-1] == self.eos_id)
        return rollout_batch(rows, responses, logprobs, finished, self.pad_id, params.max_new_tokens,
                             torch.cuda.current_device())
