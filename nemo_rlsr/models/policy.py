"""The trainable policy: a megatron GPTModel under megatron DDP and a megatron optimizer.

`MegatronPolicy` exposes the three things the RLSR loop needs: per-token logprobs of given tokens
(`logprobs`), one optimizer step over a batch with a caller-supplied loss (`train_step`), and its
weights for the rollout engine (`module`). Both go through megatron's forward/backward schedule, so
the same code runs with pipeline parallelism (1F1B over the PP group), without it, and interleaved
(`parallel.virtual_pipeline_parallel`: several model `chunks` per rank, each a run of layers).

Loss convention: a loss function returns the SUM of its per-token loss over the micro-batch and
megatron (`calculate_per_token_loss=True`) divides the gradients by the number of valid tokens
summed over all micro-batches and all data-parallel ranks. The result is the token mean of the
whole step's batch, independent of how it is split into micro-batches and ranks. How a batch is
cut into micro-batches (fixed row counts, or a token budget) is models/microbatches.py's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from nemo_rlsr.config import ModelConfig, OptimizerConfig
from nemo_rlsr.distributed.parallel import ParallelContext
from nemo_rlsr.config.rules import attention_layout
from nemo_rlsr.models.gpt import build_gpt, use_transformer_engine
from nemo_rlsr.models.logprobs import token_logprobs
from nemo_rlsr.models.optimizer_step import build_optimizer, step_unless_nonfinite
from nemo_rlsr.models.packed_seq import ThdStream, thd_streams
from nemo_rlsr.models.precision import sequence_multiple


@dataclass
class TokenBatch:
    """Token ids laid out [B, T], with the tokens that count in the loss marked.

    `targets[:, t]` is the token at position t+1 (what the logits at t predict); `loss_mask` and
    every per-token tensor in `extras` are aligned with `targets`. `valid` marks real (non-pad)
    input positions; pads are excluded as attention keys so left-padded prompts see only themselves.
    `segment_ids` (packed rows, e.g. SFT's `sft.pack_sequences`): which example of the row each
    position belongs to; a token then attends only within its own example, whose positions restart at 0.
    `target_ids`: the targets when they cannot be read off `input_ids` (a context-parallel rank's
    part of the rows, `split_for_context_parallel`).
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    loss_mask: torch.Tensor
    extras: dict[str, torch.Tensor]
    segment_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        if self.target_ids is not None:
            return self.target_ids
        pad = torch.zeros_like(self.input_ids[:, :1])
        return torch.cat([self.input_ids[:, 1:], pad], dim=1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, end: int) -> "TokenBatch":
        return TokenBatch(
            self.input_ids[start:end],
            self.valid[start:end],
            self.loss_mask[start:end],
            {k: v[start:end] for k, v in self.extras.items()},
            None if self.segment_ids is None else self.segment_ids[start:end],
            None if self.target_ids is None else self.target_ids[start:end],
        )

    def to(self, device: torch.device) -> "TokenBatch":
        """Every tensor of the batch, extras included, on `device` (those already there are kept, not
        copied). Batches are built in host memory (data readers, packing, rewards from the encoders),
        and on a GPU an op that mixes a host tensor with a device one fails."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TokenBatch(move(self.input_ids), move(self.valid), move(self.loss_mask),
                          {k: move(v) for k, v in self.extras.items()}, move(self.segment_ids), move(self.target_ids))


def attention_mask(valid: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Megatron's boolean mask [B, 1, T, T], True = not attended: future positions and pad keys, and
    with `segment_ids` keys of another segment (block-diagonal causal: packed examples stay apart)."""
    length = valid.shape[1]
    future = torch.ones(length, length, dtype=torch.bool, device=valid.device).triu(1)
    mask = future[None, None] | ~valid[:, None, None, :].bool()
    if segment_ids is not None:
        mask = mask | (segment_ids[:, None, :, None] != segment_ids[:, None, None, :])
    return mask


def position_ids(input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """0..T-1 per row, or restarting at 0 where a new segment starts. (RoPE, which the policy uses,
    sees only offsets inside a segment under the block-diagonal mask; learned position embeddings read these.)"""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if segment_ids is None:
        return positions
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return positions - torch.where(starts, positions, 0).cummax(dim=1).values


def split_for_context_parallel(batch: TokenBatch) -> TokenBatch:
    """This context-parallel rank's positions of every row (models/context_parallel.py): ids,
    validity, loss mask, segment ids, targets (taken from the whole rows first) and per-token extras;
    per-row extras (e.g. advantages [B]) stay whole. Loss sums over it are this rank's share of the
    row's; megatron sums them and the token counts over DP x CP."""
    from nemo_rlsr.models.context_parallel import split_for_cp

    length = batch.input_ids.shape[1]
    return TokenBatch(
        split_for_cp(batch.input_ids), split_for_cp(batch.valid), split_for_cp(batch.loss_mask),
        {k: split_for_cp(v) if v.dim() >= 2 and v.shape[1] == length else v for k, v in batch.extras.items()},
        None if batch.segment_ids is None else split_for_cp(batch.segment_ids),
        split_for_cp(batch.targets),
    )


def pad_sequence_length(batch: TokenBatch, multiple: int) -> TokenBatch:
    """Right-pad every row to a length divisible by `multiple` with positions that are neither
    attended to nor counted in the loss (FP8 GEMMs need aligned token counts;
    models/precision.sequence_multiple). Per-token extras are padded with zeros."""
    length = batch.input_ids.shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch

    def pad(t: torch.Tensor, value=0) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, extra), value=value)

    return TokenBatch(
        pad(batch.input_ids), pad(batch.valid, False), pad(batch.loss_mask),
        {k: pad(v) if v.dim() >= 2 and v.shape[1] == length else v for k, v in batch.extras.items()},
        None if batch.segment_ids is None else pad(batch.segment_ids, -1),
    )


# A loss: (logprobs [b, T], entropy [b, T] or None, micro-batch) -> (sum of loss over valid tokens, metric sums).
# The entropy (a metric) is computed only for a train_step called `with_entropy=True`, else it is None.
LossFn = Callable[[torch.Tensor, torch.Tensor | None, TokenBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class MegatronPolicy:
    """GPTModel + DDP + optimizer for this rank's TP/PP shard."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: OptimizerConfig | None,
        vocab_size: int,
        ctx: ParallelContext,
    ) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        self.ctx = ctx
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        # One GPTModel per virtual pipeline stage of this rank (interleaved schedule), else just one.
        self.chunks = [build_gpt(model_cfg, vocab_size, ctx, vp_stage=stage if ctx.vpp else None)
                       for stage in range(ctx.virtual_stages)]
        # Batches are padded to this length multiple (FP8 GEMM alignment; TP under sequence parallelism;
        # 2 x CP chunks under context parallelism).
        self.sequence_multiple = sequence_multiple(model_cfg, ctx)
        # THD: each micro-batch's valid tokens as one stream of sequences (models/packed_seq.py)
        self.te_spec = use_transformer_engine(model_cfg)
        self.thd = attention_layout(model_cfg.attention_layout, self.te_spec) == "thd"
        self.config = self.chunks[0].config
        self.optimizer = None
        self.models = list(self.chunks)  # what the schedule runs: the chunks, each under DDP when training
        if optim_cfg is not None:
            self.models = [
                DistributedDataParallel(
                    config=chunk.config,
                    ddp_config=DistributedDataParallelConfig(
                        grad_reduce_in_fp32=True,
                        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
                        fp8_param_gather=model_cfg.fp8_param_gather,
                    ),
                    module=chunk,
                    disable_bucketing=stage > 0,  # megatron's rule: only the first chunk's buckets overlap
                )
                for stage, chunk in enumerate(self.chunks)
            ]
            for chunk in self.chunks:  # each chunk has its own TransformerConfig
                chunk.config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = build_optimizer(optim_cfg, self.models)

    @property
    def module(self) -> torch.nn.Module:
        """This rank's whole model, for code that runs it outside the schedule (samplers, eval).
        Interleaved PP splits it into `chunks`, which such code cannot run: a clear error then."""
        if len(self.chunks) > 1:
            raise ValueError(f"parallel.virtual_pipeline_parallel={len(self.chunks)} splits this rank's model "
                             f"into chunks: use `policy.chunks` (this code path needs one module)")
        return self.chunks[0]

    @functools.cached_property
    def hf_adapter(self):
        """The Hugging Face architecture (a models/hf adapter) this policy's weights are named and
        announced in wherever they leave the trainer: the refit stream and the rollout engine's
        config.json (generation/factory.py), `export-hf`. Resolved once and kept: model.hf_path's
        config.json `model_type`, else the dense family of the shape (Llama for the tiny policy;
        models.hf.adapter_for_model). On first use, so that a policy nothing exports (a tiny MoE
        built without hf_path) needs none; an engine that holds its own weights asks at build time."""
        from nemo_rlsr.models.hf import adapter_for_model

        return adapter_for_model(self.model_cfg)

    @property
    def device(self) -> torch.device:
        """Where this rank's model lives: every batch a step runs is moved here first (`_run`)."""
        return next(self.chunks[0].parameters()).device

    @property
    def weights(self) -> torch.nn.Module:
        """Every parameter of this rank in one module (digests, copies): the chunk itself without
        interleaving (names unchanged), else the chunks in a ModuleList."""
        return self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)

    # ---- forward passes through megatron's schedule -------------------------------------------

    def _run(self, batch: TokenBatch, micro_batch_size: int, loss_fn: LossFn, forward_only: bool,
             temperature: float, max_tokens: int | None = None, with_entropy: bool = False):
        """Forward (and backward) over `batch` cut into micro-batches (models/microbatches.py):
        fixed ones of `micro_batch_size` rows, or with `max_tokens` token-budget ones; the same
        count and shapes on the ranks whose MoE layers exchange tokens (fillers). Returns (megatron's
        per-micro-batch outputs, the micro-batches)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_rlsr.generation.lockstep import lockstep_group
        from nemo_rlsr.models.microbatches import agree_across_ranks, plan_micro_batches

        # The one place where a step's tensors (ids, masks, extras such as advantages computed from
        # host rewards) reach the model's device; everything below is computed from them there.
        batch = pad_sequence_length(batch.to(self.device), self.sequence_multiple)
        planned = plan_micro_batches(batch, micro_batch_size, max_tokens, self.sequence_multiple)
        # The interleaved pipeline schedule needs whole groups of PP micro-batches; MoE layers that
        # exchange tokens across DP ranks need the same micro-batches on each of them.
        group = lockstep_group()
        micro = agree_across_ranks(planned, batch, self.ctx.pp if len(self.models) > 1 else 1, group)
        batches = [mb.batch for mb in micro]
        streams = thd_streams(batches, self.sequence_multiple, group) if self.thd else [None] * len(micro)
        # Under a budget the shapes vary: pipeline stages then send each activation's shape first.
        # So do THD streams (one per micro-batch, as long as its valid tokens).
        for chunk in self.chunks:
            chunk.config.variable_seq_lengths = (bool(max_tokens) or self.thd) and self.ctx.pp > 1

        def forward_step(data_iterator: Iterator[tuple[TokenBatch, ThdStream | None]], model):
            mb, stream = next(data_iterator)
            if stream is not None:  # [1, stream] tokens; cu_seqlens for TE, their block-causal mask for the local spec
                output = model(stream.gather(mb.input_ids), stream.positions, **stream.attention_inputs(self.te_spec))
                return output, functools.partial(loss_func, mb, stream)
            positions = position_ids(mb.input_ids, mb.segment_ids)
            mask = attention_mask(mb.valid, mb.segment_ids)
            if self.ctx.cp > 1:  # this CP rank's positions, and the mask rows of its queries (all keys)
                from nemo_rlsr.models.context_parallel import split_for_cp

                mb, positions, mask = split_for_context_parallel(mb), split_for_cp(positions), split_for_cp(mask, dim=2)
            output = model(mb.input_ids, positions, mask)
            return output, functools.partial(loss_func, mb, None)

        def loss_func(mb: TokenBatch, stream: ThdStream | None, logits: torch.Tensor):
            """The loss of a micro-batch from its logits ([b, T] rows, or a THD stream whose per-token
            results go back to the rows before the loss function sees them)."""
            targets = mb.targets if stream is None else stream.gather(mb.targets)
            logprobs, entropy = token_logprobs(logits, targets, temperature, self.vocab_size,
                                               self.model_cfg.logprob_chunk_tokens, with_entropy)
            if stream is not None:
                logprobs = stream.scatter(logprobs)
                entropy = None if entropy is None else stream.scatter(entropy)
            loss_sum, metrics = loss_fn(logprobs, entropy, mb)
            num_tokens = mb.loss_mask.sum().to(torch.int)
            return loss_sum, num_tokens, {**metrics, "num_tokens": num_tokens.detach().float()}

        for model in self.models:
            model.train(not forward_only)
        # The shape megatron allocates pipeline buffers with (each one's own under a budget).
        rows, seq_length = (1, streams[0].length) if self.thd else micro[0].batch.input_ids.shape
        # Interleaved: every chunk walks the micro-batches in order (the first reads the tokens, the
        # last the targets), so each gets its own iterator.
        pairs = list(zip(batches, streams))
        data = [iter(pairs) for _ in self.models] if len(self.models) > 1 else iter(pairs)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=self.models,
            num_microbatches=len(micro),
            seq_length=seq_length,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
        return outputs, micro

    def logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float = 1.0,
                 max_tokens: int | None = None) -> torch.Tensor:
        """Per-token logprobs of `batch.targets` [B, T] under softmax(logits / `temperature`), on every
        rank (gathered over CP, broadcast from the last PP stage), on the model's device. The
        temperature is the caller's: the rollouts' sampling temperature when the numbers must match
        what an engine sampled from, 1 for the model's own likelihood. `max_tokens`: token-budget
        micro-batches (models/microbatches.py; `micro_batch_size` is then unused); rows come back in
        `batch`'s order, columns after a row's micro-batch width hold 0 (pads, never in a loss)."""

        def keep_logprobs(logprobs, entropy, mb):
            return logprobs.sum() * 0.0, {"logprobs": logprobs.detach()}

        with torch.no_grad():
            outputs, micro = self._run(batch, micro_batch_size, keep_logprobs, forward_only=True,
                                       temperature=temperature, max_tokens=max_tokens)
        from megatron.core import parallel_state

        from nemo_rlsr.models.microbatches import restore_order

        rows, width = batch.input_ids.shape
        result = torch.empty((rows, width), dtype=torch.float32, device=self.device)
        if parallel_state.is_pipeline_last_stage():
            from nemo_rlsr.models.context_parallel import gather_from_cp

            result = restore_order([gather_from_cp(out["logprobs"]) for out in outputs], micro, rows, width)
        if self.ctx.pp > 1:
            dist.broadcast(
                result,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return result

    def train_step(
        self, batch: TokenBatch, micro_batch_size: int, loss_fn: LossFn, skip_nonfinite: bool = False,
        temperature: float = 1.0, max_tokens: int | None = None, with_entropy: bool = False,
    ) -> dict[str, float]:
        """One optimizer step on `batch` (this rank's DP shard). Returns the loss function's metrics
        averaged per token over the global batch (every rank gets the same numbers), `num_tokens`,
        `grad_norm` and `update_skipped`.

        `loss_fn` gets the logprobs of softmax(logits / `temperature`): 1 for a likelihood objective
        (pre-training, SFT); an RL loss whose ratio compares them with logprobs taken at the sampling
        temperature passes that temperature. It gets their entropy only `with_entropy` (a metric:
        one more chunk-sized fp32 tensor and a dot product per chunk of the loss), else None.

        `skip_nonfinite`: when the global loss or gradient norm is NaN/Inf, apply nothing and
        return `nonfinite=1` (an fp32/bf16 megatron optimizer has no grad scaler to catch it and
        would write NaN into every weight). The norm is computed once, as without it
        (models/optimizer_step.py); every rank takes the same decision because both numbers are
        globally reduced.

        `max_tokens`: token-budget micro-batches instead of `micro_batch_size` rows each
        (models/microbatches.py); the loss and gradient are the same (per-token normalisation).
        """
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs, _ = self._run(batch, micro_batch_size, loss_fn, forward_only=False, temperature=temperature,
                               max_tokens=max_tokens, with_entropy=with_entropy)
        metrics = reduce_metric_sums(outputs, self.ctx, self.device)
        if skip_nonfinite:
            update_ok, grad_norm, nonfinite = step_unless_nonfinite(self.optimizer, metrics.get("loss", 0.0))
            metrics["nonfinite"] = float(nonfinite)
        else:
            update_ok, grad_norm, _ = self.optimizer.step()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = float(not update_ok)
        return metrics

    @property
    def num_parameters(self) -> int:
        """Parameters of this rank's shard (TP slice of this PP stage)."""
        return sum(p.numel() for p in self.weights.parameters())

    def set_learning_rate(self, lr: float) -> None:
        """The LR of the next optimizer steps (SFT's schedule sets it before each one)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def rebuild_optimizer(self, optim_cfg: OptimizerConfig) -> None:
        """A fresh optimizer (new LR, empty Adam moments), e.g. between base pre-training and RL."""
        self.optimizer = build_optimizer(optim_cfg, self.models)

    def state_dict_for_checkpoint(self, is_loading: bool = False, include_optimizer: bool = True) -> dict:
        """megatron sharded state dicts of model and optimizer (dist_checkpointing format).

        `is_loading=True` builds the dict to load into (the optimizer then allocates its state so
        there is something to load into). The DistributedOptimizer's state is saved in the
        `dp_reshardable` format: one shard per DP rank, no gather, reshardable across DP sizes only
        (megatron's default format fails; compat/megatron.py).
        """
        from nemo_rlsr.compat.megatron import checkpoint_metadata

        metadata = checkpoint_metadata()
        state = {key: chunk.sharded_state_dict(metadata=metadata) for key, chunk in zip(self._chunk_keys, self.chunks)}
        model_sd = state["model"] if len(self.chunks) == 1 else dict(state)
        if include_optimizer and self.optimizer is not None:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=metadata
            )
        return state

    @property
    def _chunk_keys(self) -> list[str]:
        """Checkpoint keys of the chunks: `model`, or megatron's `model0`, `model1`... per virtual
        stage. Tensors inside are keyed by GLOBAL layer, so either form loads into the other layout."""
        return ["model"] if len(self.chunks) == 1 else [f"model{i}" for i in range(len(self.chunks))]

    def load_model_state(self, loaded: dict) -> None:
        """Copy the model part of a `dist_checkpointing.load` result (see state_dict_for_checkpoint)."""
        for key, chunk in zip(self._chunk_keys, self.chunks):
            chunk.load_state_dict(loaded[key])


def reduce_metric_sums(outputs: list[dict[str, torch.Tensor]], ctx: ParallelContext,
                       device: torch.device) -> dict[str, float]:
    """Sum per-micro-batch metric sums, all-reduce over DP x CP (each CP rank summed its part of the
    rows), divide by the global token count, and
    broadcast from the last PP stage so that every rank returns the same numbers. The sums are
    reduced on `device` (the model's: NCCL reduces device tensors only), whichever tensors a loss
    function returned its metrics in."""
    from megatron.core import parallel_state

    result: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage():
        names = sorted(outputs[0])
        sums = torch.stack([sum(out[k].float().sum().to(device) for out in outputs) for k in names])
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        tokens = float(sums[names.index("num_tokens")])
        result = {k: float(v) / max(tokens, 1.0) for k, v in zip(names, sums) if k != "num_tokens"}
        result["num_tokens"] = tokens
    if ctx.pp > 1:
        box = [result]
        dist.broadcast_object_list(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        result = box[0]
    return result
