"""`nemo-rlsr export-hf` and `nemo-rlsr eval`: a trained checkpoint, outside the training loop.

Both load a checkpoint into a one-process TP=1/PP=1 policy (dist checkpoints reshard on load, so
any training layout works) and read the run's config and word tokenizer from the checkpoint
itself: nothing but the checkpoint directory is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nemo_rlsr.config import RLSRConfig, from_dict
from nemo_rlsr.data.instructions import BUNDLED_DATASET, encode_prompt, load_instructions
from nemo_rlsr.data.tokenizer import WordTokenizer
from nemo_rlsr.eval.formats import alpaca_eval_outputs, arena_hard_answers, write_answer_files


@dataclass
class LoadedPolicy:
    cfg: RLSRConfig
    tokenizer: WordTokenizer
    module: torch.nn.Module


def load_policy(checkpoint: str | Path) -> LoadedPolicy:
    """The checkpoint's weights in a TP=1 GPTModel, with the run's config and tokenizer."""
    from megatron.core import dist_checkpointing

    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.trainer.checkpoint import load_checkpoint

    extra = dist_checkpointing.load_common_state_dict(str(checkpoint))["extra"]
    cfg = from_dict(extra["config"], f"{checkpoint} (saved config)")
    tokenizer = WordTokenizer.from_json(extra["tokenizer"])
    ctx = init_distributed(1, 1, cfg.parallel.seed)
    policy = MegatronPolicy(cfg.model, None, tokenizer.vocab_size, ctx)
    load_checkpoint(checkpoint, policy, load_optimizer=False)
    return LoadedPolicy(cfg, tokenizer, policy.module.eval())


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write `LlamaForCausalLM.save_pretrained` (safetensors + config.json) and `word_vocab.json`.

    The tiny word tokenizer has no Hugging Face tokenizer class: its id -> token table is saved as
    `word_vocab.json` (WordTokenizer.load reads it) and prompts must be encoded with it
    (`render_prompt` + `<bos>`); HF tools that need an AutoTokenizer cannot read this folder alone.
    """
    from transformers import LlamaForCausalLM

    from nemo_rlsr.models.hf_llama import llama_config, to_hf

    loaded = load_policy(checkpoint)
    vocab = loaded.tokenizer.vocab_size
    hf = LlamaForCausalLM(llama_config(loaded.cfg.model, vocab, loaded.module.config.layernorm_epsilon,
                                       loaded.tokenizer))
    missing, unexpected = hf.load_state_dict(to_hf(loaded.module.state_dict(), loaded.cfg.model, vocab),
                                             strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF export: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    out = Path(out)
    hf.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save(out / "word_vocab.json")
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
    rollouts = engine.generate([encode_prompt(tok, e.prompt) for e in examples], params, seed)
    outputs = [tok.decode(ids) for ids in rollouts.response_ids]
    name = Path(checkpoint).resolve().name
    dataset = Path(prompts).stem if prompts else "nemo_rlsr_heldout"
    alpaca = alpaca_eval_outputs([e.prompt for e in examples], outputs, name, dataset)
    arena = arena_hard_answers([str(i) for i in range(len(examples))], outputs,
                               [len(ids) for ids in rollouts.response_ids], name)
    out = Path(out)
    alpaca_path, arena_path = write_answer_files(out, alpaca, arena)
    reward = build_reward_actor(loaded.cfg.reward, "cpu")
    similarity = F.cosine_similarity(reward.embed(outputs), reward.embed([e.reference for e in examples]))
    summary = {"checkpoint": str(checkpoint), "prompts": str(prompts or BUNDLED_DATASET), "num_prompts": len(examples),
               "mean_similarity_to_reference": float(similarity.mean()),
               "alpaca_eval": str(alpaca_path), "arena_hard": str(arena_path)}
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
