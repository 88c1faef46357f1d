"""`nemo-rlsr export-hf` and `nemo-rlsr eval`: a trained checkpoint, outside the training loop.

Both load a checkpoint into a one-process TP=1/PP=1 policy (dist checkpoints reshard on load, so
any training layout works) and read the run's config and word tokenizer from the checkpoint
itself: nothing but the checkpoint directory is needed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nemo_rlsr.config import RLSRConfig, from_dict
from nemo_rlsr.data.chat import encode_chat_prompt
from nemo_rlsr.data.instructions import BUNDLED_DATASET, load_instructions
from nemo_rlsr.data.chat import Tokenizer
from nemo_rlsr.data.tokenizer import WordTokenizer
from nemo_rlsr.eval.formats import alpaca_eval_outputs, arena_hard_answers, write_answer_files

if TYPE_CHECKING:
    from nemo_rlsr.models.policy import MegatronPolicy


@dataclass
class LoadedPolicy:
    cfg: RLSRConfig
    tokenizer: Tokenizer
    policy: MegatronPolicy  # its hf_adapter is the architecture export-hf writes

    @property
    def module(self) -> torch.nn.Module:
        return self.policy.module


def run_tokenizer(cfg: RLSRConfig, saved: str) -> Tokenizer:
    """The run's tokenizer: a word tokenizer is stored in the checkpoint; an HF one is re-read from the
    run's data.tokenizer_path and must be the one the weights were trained with."""
    if json.loads(saved).get("type") != "hf":
        return WordTokenizer.from_json(saved)
    from nemo_rlsr.data.chat import HFTokenizer

    tokenizer = HFTokenizer(cfg.data.tokenizer_path)
    if tokenizer.to_json() != saved:
        raise ValueError(f"data.tokenizer_path={cfg.data.tokenizer_path} is not the tokenizer the checkpoint was trained with")
    return tokenizer


def load_policy(checkpoint: str | Path) -> LoadedPolicy:
    """The checkpoint's weights in a TP=1 GPTModel, with the run's config and tokenizer."""
    from megatron.core import dist_checkpointing

    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.trainer.checkpoint import load_checkpoint
    from nemo_rlsr.trainer.state import resolve_checkpoint

    # A complete checkpoint (sizes against its manifest: hashing a large one is not worth it here),
    # else an error naming the path (the CLI exits 2).
    checkpoint = resolve_checkpoint(checkpoint, checksums=False)
    extra = dist_checkpointing.load_common_state_dict(str(checkpoint))["extra"]
    cfg = from_dict(extra["config"], f"{checkpoint} (saved config)")
    tokenizer = run_tokenizer(cfg, extra["tokenizer"])
    ctx = init_distributed(ParallelDims(seed=cfg.parallel.seed))  # one process, the whole model
    policy = MegatronPolicy(cfg.model, None, tokenizer.vocab_size, ctx)
    load_checkpoint(checkpoint, policy, load_optimizer=False)
    policy.module.eval()
    return LoadedPolicy(cfg, tokenizer, policy)


def export_hf(checkpoint: str | Path, out: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write an HF checkpoint (config.json, safetensors files + index; models/hf/save.py) and the
    tokenizer: an HF tokenizer as its own files, the word tokenizer as `word_vocab.json`. The
    architecture is the policy's (MegatronPolicy.hf_adapter): Llama for the tiny policy.

    The tiny word tokenizer has no Hugging Face tokenizer class: its id -> token table is saved as
    `word_vocab.json` (WordTokenizer.load reads it) and prompts must be encoded with it
    (`render_prompt` + `<bos>`); HF tools that need an AutoTokenizer cannot read this folder alone.
    """
    from nemo_rlsr.models.hf.save import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint

    loaded = load_policy(checkpoint)
    tok = loaded.tokenizer
    cfg = dataclasses.replace(loaded.cfg.model, vocab_size=loaded.cfg.model.vocab_size or tok.vocab_size)
    special = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    out = save_hf_checkpoint(loaded.module, loaded.policy.hf_adapter, cfg, out,
                             max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, extra_config=special)
    if isinstance(tok, WordTokenizer):
        tok.save(out / "word_vocab.json")
    else:
        tok.hf.save_pretrained(str(out))
    return out


def lm_eval_command(hf_dir: str | Path, tasks: str = "hellaswag,arc_easy") -> str:
    """The lm-evaluation-harness command for an exported folder (needs a real HF tokenizer there)."""
    return (f"lm_eval --model hf --model_args pretrained={hf_dir},dtype=float32 "
            f"--tasks {tasks} --batch_size 8 --output_path {Path(hf_dir) / 'lm_eval'}")


def evaluate(checkpoint: str | Path, prompts: str | Path | None, out: str | Path,
             max_new_tokens: int | None = None, seed: int = 0) -> dict:
    """Greedy answers to every prompt of `prompts` (default: the bundled held-out split) written
    as AlpacaEval and Arena-Hard answer files; with references, also the mean MiniLM cosine of each
    answer to its reference (the RLSR reward without its repetition penalty). Returns the summary."""
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
    from nemo_rlsr.rewards import build_reward_actor

    loaded = load_policy(checkpoint)
    tok = loaded.tokenizer
    examples = load_instructions(prompts or BUNDLED_DATASET, split=None if prompts else "heldout")
    engine = TorchRolloutEngine(loaded.module, tok.pad_id, tok.eos_id, tok.vocab_size)
    params = SamplingParams(max_new_tokens or loaded.cfg.rollout.max_new_tokens, greedy=True)
    rollouts = engine.generate([encode_chat_prompt(tok, [{"role": "user", "content": e.prompt}]) for e in examples],
                               params, seed)
    outputs = [tok.decode(ids) for ids in rollouts.response_ids]
    name = Path(checkpoint).resolve().name
    dataset = Path(prompts).stem if prompts else "nemo_rlsr_heldout"
    alpaca = alpaca_eval_outputs([e.prompt for e in examples], outputs, name, dataset)
    arena = arena_hard_answers([str(i) for i in range(len(examples))], outputs,
                               [len(ids) for ids in rollouts.response_ids], name)
    out = Path(out)
    alpaca_path, arena_path = write_answer_files(out, alpaca, arena)
    reward = build_reward_actor(loaded.cfg.reward, "cpu")
    try:
        similarity = F.cosine_similarity(reward.embed(outputs), reward.embed([e.reference for e in examples]))
    finally:
        reward.close()
    summary = {"checkpoint": str(checkpoint), "prompts": str(prompts or BUNDLED_DATASET), "num_prompts": len(examples),
               "mean_similarity_to_reference": float(similarity.mean()),
               "alpaca_eval": str(alpaca_path), "arena_hard": str(arena_path)}
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
