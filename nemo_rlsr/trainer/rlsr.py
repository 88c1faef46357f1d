"""The RLSR training loop: sample -> reward -> advantages -> logprobs -> GRPO update -> log.

Reads top to bottom like one RLSR step. Every rank runs this function (SPMD); each data-
parallel rank samples and scores its own shard of the prompts, and rank 0 writes logs and plots.
Reliability hooks, each in its own module: preemption.py (signal -> checkpoint -> exit 75),
guards.py (reward range, non-finite updates), watchdog.py (stack dumps of a hung step),
manifest.py via checkpoint.py (verified resume), fingerprint.py (weights digest in summary.json).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_rlsr.algorithms.grpo import GRPOLossConfig, group_advantages, grpo_loss, tis_metrics, tis_weights
from nemo_rlsr.config import OptimizerConfig, RLSRConfig, to_dict
from nemo_rlsr.data.dataset import TrainingExample, load_training_data
from nemo_rlsr.data.instructions import InstructionExample
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import ParallelContext, init_distributed
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.factory import build_engine
from nemo_rlsr.models.hf.start import load_hf_policy, with_hf_model
from nemo_rlsr.models.policy import LossFn, MegatronPolicy, TokenBatch
from nemo_rlsr.models.reference import build_reference
from nemo_rlsr.rewards import build_reward_actor
from nemo_rlsr.rewards.diagnostics import reward_diagnostics
from nemo_rlsr.trainer.checkpoint import (
    find_resumable_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from nemo_rlsr.trainer.fingerprint import parameters_sha256
from nemo_rlsr.trainer.guards import NonFiniteGuard, inject_nan
from nemo_rlsr.trainer.manifest import verify_checkpoint
from nemo_rlsr.trainer.metrics import MetricsLogger, plot_reward, read_metrics
from nemo_rlsr.trainer.loop import debug_stall, guard_metrics, run_steps
from nemo_rlsr.trainer.preemption import PreemptionHandler
from nemo_rlsr.trainer.pretrain import pretrain_on_text
from nemo_rlsr.trainer.startup import Machine, check_startup
from nemo_rlsr.trainer.throughput import step_throughput


@dataclass
class Prompts:
    """Examples with their questions already rendered and tokenised."""

    examples: list[InstructionExample]
    token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.examples)


def grpo_loss_fn(cfg: GRPOLossConfig) -> LossFn:
    """GRPO loss summed over the micro-batch's tokens; megatron divides by the global token count."""

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
        loss, metrics = grpo_loss(
            logprobs, mb.extras["old_logprobs"], mb.extras["ref_logprobs"], mb.extras["advantages"],
            mb.loss_mask, cfg, global_valid_tokens=1.0, engine_logprobs=mb.extras.get("engine_logprobs"),
        )
        metrics["loss"] = loss.detach()
        metrics["entropy"] = (entropy * mb.loss_mask).sum()
        return loss, metrics

    return loss_fn


def gather_over_dp(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate a 1-D tensor from every data-parallel rank (same length on each), on `device`
    (the policy's). NCCL gathers device tensors only, and rewards arrive in host memory (the
    encoders return them there), so they are moved first; at DP=1 too, so that the result can
    meet other device tensors."""
    from megatron.core import parallel_state

    values = values.to(device)
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values.contiguous(), group=group)
    return torch.cat(parts)


class RLSRTrainer:
    """Owns the components of a run; `fit()` is the loop."""

    def __init__(self, cfg: RLSRConfig, resume: str | None = None) -> None:
        self.cfg = cfg = with_hf_model(cfg)  # model.hf_path: the shape from its config.json
        self.ctx: ParallelContext = init_distributed(ParallelDims.from_config(cfg.parallel))
        self.run_dir = Path(cfg.trainer.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.base_dir = self.run_dir / "base"
        self._validate()
        # Early, so that a signal during setup or base pre-training is not fatal: it stops the run
        # after the first RLSR step, with a checkpoint.
        self.preemption = PreemptionHandler(cfg.trainer.preemption_signals).install()
        self.guard = NonFiniteGuard(cfg.trainer.max_consecutive_nonfinite)

        data = load_training_data(cfg.data, self._print)
        if cfg.trainer.heldout_eval and not data.heldout:
            raise ValueError(f"trainer.heldout_eval needs held-out prompts and data.format={cfg.data.format!r} "
                             f"has none: set trainer.heldout_eval=false")
        self.tokenizer = data.tokenizer
        self.train = self._prompts(data.train)
        self.heldout = self._prompts(data.heldout)
        self.all_references = sorted({t.example.reference for t in data.train + data.heldout})

        vocab = self.tokenizer.vocab_size
        self.policy = MegatronPolicy(cfg.model, self._pretrain_optimizer(), vocab, self.ctx,
                                     cfg.rollout.temperature)
        self.reference = build_reference(cfg.grpo.reference_placement, self.policy, cfg.model, vocab, self.ctx,
                                         cfg.rollout.temperature)
        self.engine = build_engine(cfg, self.policy, self.tokenizer, self.run_dir)
        self._engine_stale = True  # the engine's weights lag the policy's until the next refit
        self.reward = build_reward_actor(cfg.reward, str(self.ctx.device), self.ctx.world_size)
        per_rank = cfg.grpo.prompts_per_step // self.ctx.dp
        self.sampler = PromptSampler(len(self.train), per_rank, self.ctx.dp_rank, self.ctx.dp,
                                     seed=cfg.data.shuffle_seed)
        self.loss_fn = grpo_loss_fn(GRPOLossConfig(cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.kl_coef,
                                                   cfg.grpo.tis_cap))
        self.sampling = SamplingParams(cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                       top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                       stop_on_eos=cfg.rollout.stop_on_eos, stop=tuple(cfg.rollout.stop),
                                       n=cfg.grpo.num_generations)
        self.logger = MetricsLogger(self.run_dir, self.ctx.is_logging_rank, cfg.logging, to_dict(cfg))
        self.step = 0
        self.base_heldout: dict | None = None
        if not (resume and self._resume(resume)):
            if latest_checkpoint(self.checkpoint_dir) or latest_checkpoint(self.base_dir):
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                    f"or choose another trainer.output_dir"
                )
            self.logger.truncate_after(0)
            self._prepare_base()

    # ---- setup ---------------------------------------------------------------------------------

    def _validate(self) -> None:
        # Every start-up rule at once, on this machine: the ones `nemo-rlsr plan` checks for the cluster.
        check_startup(self.cfg, Machine.here(self.ctx.world_size), "rlsr")

    def _prompts(self, examples: list[TrainingExample]) -> Prompts:
        ids = [t.prompt_ids for t in examples]
        longest = max(map(len, ids), default=0) + self.cfg.rollout.max_new_tokens
        if longest > self.cfg.model.max_sequence_length:
            raise ValueError(
                f"prompt + rollout.max_new_tokens = {longest} tokens exceeds "
                f"model.max_sequence_length={self.cfg.model.max_sequence_length}"
            )
        return Prompts([t.example for t in examples], ids)

    def _pretrain_optimizer(self) -> OptimizerConfig:
        if self.cfg.pretrain.steps == 0:
            return self.cfg.optimizer
        return OptimizerConfig(lr=self.cfg.pretrain.lr, clip_grad=self.cfg.optimizer.clip_grad,
                               use_distributed_optimizer=self.cfg.optimizer.use_distributed_optimizer)

    def _prepare_base(self) -> None:
        """Pre-train the base or load `pretrain.init_checkpoint` (e.g. an SFT run's), freeze it as
        the reference, score it on held-out."""
        cfg = self.cfg
        if cfg.pretrain.init_checkpoint:
            from nemo_rlsr.trainer.sft import load_init_checkpoint

            path = load_init_checkpoint(cfg.pretrain.init_checkpoint, self.policy, self.tokenizer,
                                        cfg.trainer.checkpoint_checksums)
            self._print(f"initialised policy and reference from {path} "
                        f"(weights sha256 {parameters_sha256(self.policy.weights)})")
        elif cfg.model.hf_path:
            load_hf_policy(self.policy, cfg.model, self.tokenizer.vocab_size)
            self._print(f"initialised policy and reference from the HF checkpoint {cfg.model.hf_path}")
        if cfg.pretrain.steps:
            references = sorted({e.reference for e in self.train.examples})
            bar = self._progress(cfg.pretrain.steps, "pretrain base")
            losses = pretrain_on_text(self.policy, self.tokenizer, references, cfg.pretrain,
                                      cfg.model.max_sequence_length, cfg.grpo.micro_batch_size,
                                      cfg.parallel.seed, bar)
            bar.close()
            self._print(f"base pre-training: NLL {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
            self.policy.rebuild_optimizer(cfg.optimizer)
        self.reference.freeze_from(self.policy)
        if cfg.trainer.heldout_eval:
            self.base_heldout = self.evaluate_heldout()
            self._print(f"base policy on held-out prompts: {self._format_eval(self.base_heldout)}")
        self._save(self.base_dir)

    def _save(self, root: Path) -> Path:
        keep = self.cfg.trainer.keep_last_checkpoints or None
        return save_checkpoint(root, self.step, self.policy, self._extra(), keep_last=keep,
                               checksums=self.cfg.trainer.checkpoint_checksums)

    def _resume(self, resume: str) -> bool:
        """Load `resume` (a path, or "auto"). Returns False when "auto" finds nothing at all, so
        that a requeued job whose first attempt died before its first save starts afresh."""
        checksums = self.cfg.trainer.checkpoint_checksums
        base = find_resumable_checkpoint(self.base_dir, checksums)
        if resume == "auto":
            # No RLSR checkpoint yet: the base checkpoint is the state at step 0.
            path = find_resumable_checkpoint(self.checkpoint_dir, checksums) or base
            if path is None and (latest_checkpoint(self.checkpoint_dir) or latest_checkpoint(self.base_dir)):
                raise FileNotFoundError(f"--resume auto: every checkpoint under {self.run_dir} is incomplete "
                                        f"or corrupt (see the warnings above)")
            if path is None:
                self._print(f"--resume auto: no checkpoint under {self.run_dir} yet; starting afresh")
                return False
        else:
            path = Path(resume)
            problems = verify_checkpoint(path, checksums)
            if problems:
                raise FileNotFoundError(f"--resume {path}: not a complete checkpoint: {'; '.join(problems[:3])}")
        if base is None:
            raise FileNotFoundError(f"no complete base checkpoint under {self.base_dir} (the KL reference)")
        self.reference.load(base)
        self.policy.rebuild_optimizer(self.cfg.optimizer)
        extra = load_checkpoint(path, self.policy)
        self.step = extra["step"]
        self.sampler.load_state_dict(extra["sampler"])
        self.base_heldout = extra["base_heldout"]
        self.guard.load_state_dict(extra.get("guard", {"consecutive": 0, "total": 0}))
        if extra["tokenizer"] != self.tokenizer.to_json():
            raise ValueError(f"{path}: the checkpoint's tokenizer differs from this run's data")
        self.logger.truncate_after(self.step)
        self._print(f"resumed from {path} at step {self.step}")
        return True

    def _extra(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "tokenizer": self.tokenizer.to_json(),
            "config": to_dict(self.cfg),
            "base_heldout": self.base_heldout,
            "guard": self.guard.state_dict(),
        }

    # ---- one RLSR step -------------------------------------------------------------------------

    def _sample_seed(self, step: int) -> int:
        # Same on every TP/PP rank of a DP replica (they must draw identical tokens), distinct per DP rank.
        return (self.cfg.parallel.seed * 1_000_003 + step) * 131 + self.ctx.dp_rank

    def _rollout(self, prompts: Prompts, rows: list[int], seed: int, timings: dict | None = None):
        """n samples per prompt (the engine shares each prompt's KV prefix among them), decoded and
        rewarded. Rows are group-contiguous. The engine is refitted first when the policy has changed
        since its last refit, woken for generation and put back to sleep. Fills `timings` (when
        given) with time/generate, time/reward and the refit's metrics."""
        group = self.cfg.grpo.num_generations
        examples = [prompts.examples[i] for i in rows for _ in range(group)]
        refit = self.engine.update_weights() if self._engine_stale else {}
        self._engine_stale = False
        start = time.perf_counter()
        self.engine.wake()
        rollouts = self.engine.generate([prompts.token_ids[i] for i in rows], self.sampling, seed)
        self.engine.sleep()
        generated = time.perf_counter()
        texts = [self.tokenizer.decode(r) for r in rollouts.response_ids]
        scores = self.reward.score([e.prompt for e in examples], texts, [e.reference for e in examples])
        scores.check([e.prompt for e in examples])  # any RewardActor: never train on a bad number
        if timings is not None:
            timings["time/generate"] = generated - start
            timings["time/reward"] = time.perf_counter() - generated
            timings.update(refit)
        return rollouts, texts, examples, scores

    def train_step(self) -> dict[str, float]:
        cfg, timings = self.cfg, {}
        t0 = time.perf_counter()
        debug_stall(cfg.trainer, self.step + 1, self.ctx)
        rows = self.sampler.next_batch()
        rollouts, texts, _, scores = self._rollout(self.train, rows, self._sample_seed(self.step), timings)
        t1 = time.perf_counter()
        advantages = group_advantages(scores.rewards, cfg.grpo.num_generations, cfg.grpo.advantage_eps)
        # On the policy's device once (advantages come from host rewards; an engine may return host
        # tensors): the logprob passes, the loss and the metrics below all read this batch.
        batch = rollouts.to_token_batch(advantages=advantages, engine_logprobs=rollouts.engine_logprobs)
        batch = batch.to(self.policy.device)
        t2 = time.perf_counter()
        batch.extras["old_logprobs"] = self.policy.logprobs(batch, cfg.grpo.micro_batch_size)
        batch.extras["ref_logprobs"] = self.reference.logprobs(batch, cfg.grpo.micro_batch_size)
        t3 = time.perf_counter()
        mini_size = len(batch) // cfg.grpo.mini_batches_per_step
        loss_fn = inject_nan(self.loss_fn) if self.step + 1 in cfg.trainer.debug_inject_nan_steps else self.loss_fn
        updates = [self.policy.train_step(batch.slice(i, i + mini_size), cfg.grpo.micro_batch_size, loss_fn,
                                          skip_nonfinite=True)
                   for i in range(0, len(batch), mini_size)]
        t4 = time.perf_counter()
        self.step += 1
        self._engine_stale = True

        metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        metrics.update(guard_metrics(self.guard, self.step, updates))
        metrics.update(self._rollout_metrics(batch, rollouts.truncated, scores))
        if cfg.grpo.tis_cap is not None:
            weights = tis_weights(batch.extras["old_logprobs"], batch.extras["engine_logprobs"], batch.loss_mask,
                                  cfg.grpo.tis_cap)
            metrics.update(tis_metrics(weights, batch.loss_mask, cfg.grpo.tis_cap))
        timings.update({"time/advantages": t2 - t1, "time/logprobs": t3 - t2, "time/train": t4 - t3,
                        "time/step": t4 - t0})
        metrics.update(step_throughput(batch.valid.sum(), self.policy.num_parameters, t4 - t0, self.ctx))
        metrics.update(timings)
        metrics["sample/response"] = texts[0]
        return metrics

    def _rollout_metrics(self, batch: TokenBatch, truncated: torch.Tensor, scores) -> dict[str, float]:
        """Reward and response statistics over every DP rank's rollouts, from the step's batch (on the
        policy's device, its loss mask = the rollouts' response mask) and the host rewards."""
        device = self.policy.device
        rewards = gather_over_dp(scores.rewards, device)
        mask = batch.loss_mask
        lengths = gather_over_dp(mask.sum(dim=1), device)
        mismatch = ((batch.extras["engine_logprobs"] - batch.extras["old_logprobs"]).abs() * mask).sum()
        mismatch = mismatch / mask.sum().clamp(min=1)
        metrics = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "reward/min": float(rewards.min()),
            "reward/max": float(rewards.max()),
            "reward/fraction_penalized": float(gather_over_dp(scores.penalized.float(), device).mean()),
            "response/mean_length": float(lengths.mean()),
            "response/truncated_fraction": float(gather_over_dp(truncated.float(), device).mean()),
            "token_mult_prob_error": float(torch.exp(mismatch)),
        }
        # Reward-hacking diagnostics over every rank's rollouts (cosine histogram, empty, length corr, ...).
        metrics.update(reward_diagnostics(scores.map(lambda t: gather_over_dp(t.float(), device)), lengths))
        return metrics

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate_heldout(self, num_examples: int = 4) -> dict:
        """Mean reward on held-out prompts with a fixed sampling seed, and how often a response's
        nearest reference (by embedding) is its own prompt's: a policy that drifts to one generic
        answer scores a fair mean reward but a low `own_answer_rate`."""
        # Every DP rank scores all held-out prompts with the same seed: the numbers agree everywhere.
        rows = list(range(len(self.heldout)))
        seed = self.cfg.parallel.seed + 1
        _, texts, examples, scores = self._rollout(self.heldout, rows, seed)
        references = self.reward.embed(self.all_references)
        nearest = (self.reward.embed(texts) @ references.T).argmax(dim=1)
        own = torch.tensor([self.all_references[j] == e.reference for j, e in zip(nearest.tolist(), examples)])
        group = self.cfg.grpo.num_generations
        samples = [[examples[i].prompt, texts[i]] for i in range(0, len(texts), group)][:num_examples]
        return {"reward": float(scores.rewards.mean()), "own_answer_rate": float(own.float().mean()),
                "examples": samples}

    @staticmethod
    def _format_eval(result: dict) -> str:
        return f"mean reward {result['reward']:.3f}, answers its own prompt {result['own_answer_rate']:.0%}"

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Run to `trainer.steps`; raises `Preempted` after saving when a preemption signal came."""
        cfg = self.cfg
        bar = self._progress(cfg.trainer.steps, "rlsr", initial=self.step)

        def log(metrics: dict) -> None:
            self.logger.log(self.step, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                            step_s=f"{metrics['time/step']:.2f}")
            bar.update(1)

        try:
            run_steps(cfg.trainer, self.ctx, self.run_dir, cfg.trainer.steps, self.preemption, self.guard,
                      lambda: self.step, self.train_step, log, lambda: self._save(self.checkpoint_dir))
        finally:
            bar.close()
            self.logger.close()
        return self._summarise()

    def _summarise(self) -> dict:
        summary: dict = {"steps": self.step, "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
                         "param_sha256": parameters_sha256(self.policy.weights),
                         "skipped_nonfinite_updates": self.guard.total}
        if self.cfg.trainer.heldout_eval:
            summary["heldout_base"] = self.base_heldout
            summary["heldout_trained"] = self.evaluate_heldout()
        if self.ctx.is_logging_rank:
            records = read_metrics(self.logger.jsonl_path)
            rewards = [r["reward/mean"] for r in records]
            summary["reward_first10"] = sum(rewards[:10]) / len(rewards[:10])
            summary["reward_last10"] = sum(rewards[-10:]) / len(rewards[-10:])
            plot_reward(records, self.run_dir / "reward.png")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.close()
            print(f"mean reward, first 10 steps: {summary['reward_first10']:.3f}")
            print(f"mean reward, last 10 steps:  {summary['reward_last10']:.3f}")
            if self.cfg.trainer.heldout_eval:
                print(f"held-out prompts, base:    {self._format_eval(summary['heldout_base'])}")
                print(f"held-out prompts, trained: {self._format_eval(summary['heldout_trained'])}")
                for (prompt, base), (_, trained) in zip(summary["heldout_base"]["examples"],
                                                        summary["heldout_trained"]["examples"]):
                    print(f"  {prompt!r}\n    base:    {base}\n    trained: {trained}")
            print(f"metrics: {self.logger.jsonl_path}  plot: {self.run_dir / 'reward.png'}  "
                  f"checkpoint: {summary['checkpoint']}")
        return summary

    def _progress(self, total: int, desc: str, initial: int = 0) -> tqdm:
        # Redraw often on a terminal, rarely in a log file (CI, Slurm) where each redraw is a line.
        interactive = sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, mininterval=0.2 if interactive else 15.0,
                    disable=not (self.cfg.trainer.progress_bar and self.ctx.is_logging_rank))

    def _print(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            tqdm.write(message)
