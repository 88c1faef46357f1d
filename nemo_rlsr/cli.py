"""`nemo-rlsr`: the command line.

    nemo-rlsr train --config conf/rlsr_tiny.yaml [--resume [auto|PATH]] [key.path=value ...]

Runs under plain `python` (one process) or `torchrun --nproc_per_node=N` (SPMD).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _quiet_third_party() -> None:
    # megatron-core warns once per module that Apex/TE are absent; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _train(args: argparse.Namespace) -> int:
    from nemo_rlsr.config import load_config
    from nemo_rlsr.distributed.parallel import destroy_distributed
    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    cfg = load_config(args.config, args.overrides)
    trainer = RLSRTrainer(cfg, resume=args.resume)
    try:
        trainer.fit()
    finally:
        destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nemo-rlsr", description="RLSR: GRPO with an embedding-similarity reward")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run RLSR training")
    train.add_argument("--config", required=True, help="YAML config (see conf/)")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from a checkpoint directory, or 'auto' (default when the flag is bare): "
                            "the newest complete one under trainer.output_dir/checkpoints")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.num_generations=4")
    args = parser.parse_args(argv)
    _quiet_third_party()
    from nemo_rlsr.config import ConfigError

    try:
        return _train(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
