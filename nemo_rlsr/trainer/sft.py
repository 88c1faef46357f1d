"""Supervised fine-tuning (`nemo-rlsr sft`): next-token loss on the reference answers only.

Each training row is one example, the rendered prompt + reference + <eos> (data/dataset.py: the tiny
word template or the tokenizer's chat template, the same prompt tokens the RLSR rollouts start from),
right-padded; the loss mask keeps only the targets that are response tokens, so the prompt is
context, never a target. Same MegatronPolicy, same tokenizer (built from the same data as
RLSRTrainer's) and the same checkpoint `extra` fields as the RLSR trainer, so an SFT checkpoint is
what `pretrain.init_checkpoint` of an RLSR run loads (starting policy and KL reference), and what
`export-hf` / `eval` read.

The same reliability hooks as `nemo-rlsr train` (trainer/loop.py, same `trainer.*` keys): a
preemption signal saves and exits 75, non-finite updates are skipped and counted (the guard's state
is in the checkpoint), a hung step dumps stacks.

`sft.pack_sequences: true` packs each step's examples into rows of model.max_sequence_length
instead (data/packing.py): block-diagonal attention through `TokenBatch.segment_ids`, same loss.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_rlsr.config import RLSRConfig, to_dict
from nemo_rlsr.data.chat import Tokenizer
from nemo_rlsr.data.dataset import TrainingExample, load_training_data
from nemo_rlsr.data.packing import packed_sft_batch
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import init_distributed
from nemo_rlsr.models.hf.start import load_hf_policy, with_hf_model
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch
from nemo_rlsr.trainer.checkpoint import (
    find_resumable_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from nemo_rlsr.trainer.fingerprint import parameters_sha256
from nemo_rlsr.trainer.guards import NonFiniteGuard, inject_nan
from nemo_rlsr.trainer.loop import debug_stall, guard_metrics, run_steps
from nemo_rlsr.trainer.manifest import verify_checkpoint
from nemo_rlsr.trainer.metrics import MetricsLogger, read_metrics
from nemo_rlsr.trainer.preemption import PreemptionHandler
from nemo_rlsr.trainer.pretrain import nll_loss
from nemo_rlsr.trainer.startup import Machine, check_startup


def resolve_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """A complete checkpoint: `path` itself, or the newest complete one under the root `path`."""
    path = Path(path)
    if not verify_checkpoint(path, checksums):
        return path
    found = find_resumable_checkpoint(path, checksums)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a directory holding one")
    return found


def load_init_checkpoint(path: str | Path, policy: MegatronPolicy, tokenizer: Tokenizer,
                         checksums: bool = True) -> Path:
    """Load the weights (not the optimizer) of `path` into `policy`; the checkpoint's tokenizer
    must be this run's (same ids), else the weights would mean other words. Returns the path."""
    resolved = resolve_checkpoint(path, checksums)
    extra = load_checkpoint(resolved, policy, load_optimizer=False)
    if extra.get("tokenizer") != tokenizer.to_json():
        raise ValueError(f"{resolved}: the checkpoint's tokenizer differs from this run's data "
                         f"(pretrain.init_checkpoint must come from a run on the same data.path)")
    return resolved


def sft_row(example: TrainingExample, eos_id: int) -> tuple[list[int], int]:
    """(token ids, prompt length): the rendered prompt's ids + the reference's + <eos>."""
    return example.prompt_ids + example.reference_ids + [eos_id], len(example.prompt_ids)


def sft_batch(examples: list[tuple[list[int], int]], length: int, pad_id: int) -> TokenBatch:
    """Right-padded rows; `loss_mask[t]` (aligned with targets = ids[t+1]) is 1 exactly where
    ids[t+1] is a response token (reference or eos)."""
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), length)
    valid = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (tokens, prompt_len) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        valid[row, : len(tokens)] = True
        loss_mask[row, prompt_len - 1 : len(tokens) - 1] = 1.0
    return TokenBatch(ids, valid, loss_mask, {})


def lr_at(step: int, total: int, max_lr: float, warmup: int, min_ratio: float) -> float:
    """LR of optimizer step `step` (1-based): linear warmup to max_lr over `warmup` steps, then
    cosine decay to min_ratio * max_lr at step `total`."""
    if warmup and step <= warmup:
        return max_lr * step / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return max_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class SFTTrainer:
    def __init__(self, cfg: RLSRConfig, resume: str | None = None) -> None:
        self.cfg = cfg = with_hf_model(cfg)  # model.hf_path: the shape from its config.json
        self.ctx = init_distributed(ParallelDims.from_config(cfg.parallel))
        # Every start-up rule at once at this job's world size: the ones `nemo-rlsr plan --mode sft` checks.
        check_startup(cfg, Machine.here(self.ctx.world_size), "sft")
        s = cfg.sft
        self.run_dir = Path(cfg.trainer.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        # Early, as in RLSRTrainer: a signal during setup stops the run after its first step, saved.
        self.preemption = PreemptionHandler(cfg.trainer.preemption_signals).install()
        self.guard = NonFiniteGuard(cfg.trainer.max_consecutive_nonfinite)

        data = load_training_data(cfg.data, self._print)
        self.tokenizer = data.tokenizer
        self.train = [sft_row(t, self.tokenizer.eos_id) for t in data.train]
        self.heldout = [sft_row(t, self.tokenizer.eos_id) for t in data.heldout]
        self.length = max(len(ids) for ids, _ in self.train + self.heldout)
        if self.length > cfg.model.max_sequence_length:
            raise ValueError(f"longest prompt + reference + eos = {self.length} tokens exceeds "
                             f"model.max_sequence_length={cfg.model.max_sequence_length} (no truncation)")

        self.policy = MegatronPolicy(cfg.model, cfg.optimizer, self.tokenizer.vocab_size, self.ctx)
        self.sampler = PromptSampler(len(self.train), s.global_batch_size // self.ctx.dp, self.ctx.dp_rank,
                                     self.ctx.dp, seed=cfg.data.shuffle_seed)
        self.total_steps = s.steps or s.epochs * self.sampler.batches_per_epoch
        # The same sinks as the RLSR trainer (JSONL always; TensorBoard / W&B / MLflow per `logging.*`).
        self.logger = MetricsLogger(self.run_dir, self.ctx.is_logging_rank, cfg.logging,
                                    to_dict(cfg))
        self.step = 0
        self.init_from: str | None = None
        if resume:
            path = (find_resumable_checkpoint(self.checkpoint_dir, cfg.trainer.checkpoint_checksums)
                    if resume == "auto" else resolve_checkpoint(resume, cfg.trainer.checkpoint_checksums))
            if path is not None:
                extra = load_checkpoint(path, self.policy)
                if extra["tokenizer"] != self.tokenizer.to_json():
                    raise ValueError(f"{path}: the checkpoint's tokenizer differs from this run's data")
                self.step = extra["step"]
                self.sampler.load_state_dict(extra["sampler"])
                self.guard.load_state_dict(extra["guard"])
                self.logger.truncate_after(self.step)
                self._print(f"resumed from {path} at step {self.step}")
                return
        if latest_checkpoint(self.checkpoint_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                                  f"or choose another trainer.output_dir")
        self.logger.truncate_after(0)
        if cfg.pretrain.init_checkpoint:
            self.init_from = str(load_init_checkpoint(cfg.pretrain.init_checkpoint, self.policy, self.tokenizer,
                                                      cfg.trainer.checkpoint_checksums))
            self._print(f"initialised from {self.init_from}")
        elif cfg.model.hf_path:
            load_hf_policy(self.policy, cfg.model, self.tokenizer.vocab_size)
            self.init_from = cfg.model.hf_path
            self._print(f"initialised from the HF checkpoint {self.init_from}")

    def _extra(self) -> dict:
        # The fields RLSRTrainer's checkpoints carry, so that export-hf / eval / init_checkpoint read it.
        return {"step": self.step, "sampler": self.sampler.state_dict(), "tokenizer": self.tokenizer.to_json(),
                "config": to_dict(self.cfg), "base_heldout": None, "guard": self.guard.state_dict(),
                "stage": "sft"}

    def heldout_nll(self) -> float:
        """Token-mean response NLL on the held-out prompts (every rank computes the same number)."""
        batch = sft_batch(self.heldout, self.length, self.tokenizer.pad_id).to(self.policy.device)  # with the logprobs
        logprobs = self.policy.logprobs(batch, len(batch))
        return float(-(logprobs * batch.loss_mask).sum() / batch.loss_mask.sum())

    def fit(self) -> dict:
        cfg = self.cfg
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="sft", mininterval=0.2 if interactive else 15.0,
                   disable=not (cfg.trainer.progress_bar and self.ctx.is_logging_rank))
        heldout_start = self.heldout_nll() if self.heldout else None

        def log(metrics: dict) -> None:
            self.logger.log(self.step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
            bar.update(1)

        try:
            run_steps(cfg.trainer, self.ctx, self.run_dir, self.total_steps, self.preemption, self.guard,
                      lambda: self.step, self.train_step, log, self._save)
        finally:
            bar.close()
            self.logger.close()
        if latest_checkpoint(self.checkpoint_dir) is None:  # steps already done on resume
            self._save()
        return self._summarise(heldout_start)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next batch; a non-finite update is skipped and counted."""
        cfg, s = self.cfg, self.cfg.sft
        debug_stall(cfg.trainer, self.step + 1, self.ctx)
        lr = lr_at(self.step + 1, self.total_steps, cfg.optimizer.lr, s.warmup_steps, s.min_lr_ratio)
        for group in self.policy.optimizer.param_groups:
            group["lr"] = lr
        rows = self.sampler.next_batch()
        batch = self._batch([self.train[i] for i in rows])
        loss_fn = inject_nan(nll_loss) if self.step + 1 in cfg.trainer.debug_inject_nan_steps else nll_loss
        metrics = self.policy.train_step(batch, s.micro_batch_size, loss_fn, skip_nonfinite=True)
        self.step += 1
        metrics.update(guard_metrics(self.guard, self.step, [metrics]))
        metrics["rows"] = float(len(batch))
        metrics["lr"] = lr
        metrics["epoch"] = float(self.sampler.epoch)
        return metrics

    def _batch(self, examples: list[tuple[list[int], int]]) -> TokenBatch:
        s = self.cfg.sft
        if s.pack_sequences:
            return packed_sft_batch(examples, self.cfg.model.max_sequence_length, self.tokenizer.pad_id,
                                    s.micro_batch_size)
        return sft_batch(examples, self.length, self.tokenizer.pad_id)

    def _save(self) -> Path:
        keep = self.cfg.trainer.keep_last_checkpoints or None
        return save_checkpoint(self.checkpoint_dir, self.step, self.policy, self._extra(), keep_last=keep,
                               checksums=self.cfg.trainer.checkpoint_checksums)

    def _summarise(self, heldout_start: float | None) -> dict:
        summary: dict = {"steps": self.step, "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
                         "param_sha256": parameters_sha256(self.policy.weights), "init_checkpoint": self.init_from,
                         "skipped_nonfinite_updates": self.guard.total}
        if self.heldout:
            summary["heldout_nll_start"] = heldout_start
            summary["heldout_nll_end"] = self.heldout_nll()
        if self.ctx.is_logging_rank:
            losses = [r["loss"] for r in read_metrics(self.logger.jsonl_path)]
            if losses:
                summary["loss_first"], summary["loss_last"] = losses[0], losses[-1]
                print(f"sft loss (response tokens): {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
            if self.heldout:
                print(f"held-out response NLL: {heldout_start:.3f} -> {summary['heldout_nll_end']:.3f}")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.close()
            print(f"metrics: {self.logger.jsonl_path}  checkpoint: {summary['checkpoint']}")
        return summary

    def _print(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            tqdm.write(message)
