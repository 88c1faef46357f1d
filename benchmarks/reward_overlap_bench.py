"""The reward phase's share of an RLSR step with scoring overlapped with generation, against none.

    python benchmarks/reward_overlap_bench.py                 # CPU demo config, 4 chunks, 3 steps each
    python benchmarks/reward_overlap_bench.py --chunks 2 --steps 1 --set grpo.prompts_per_step=4   # smoke

One trainer on the demo config (conf/rlsr_tiny.yaml, the bundled MiniLM as the reward), in this
process on one rank: steps alternate between reward.overlap_chunks=1 (generate everything, then
score everything) and --chunks (each chunk scored in the background while the next generates), so
both variants see the same machine load. Per variant, the median over its steps of

* reward share = time/reward / time/step: the step's wait for rewards after generation ended;
* hidden = time/reward_overlapped: scoring that ran while later chunks generated;

and the ratio of the shares (on / off), and of the step times: in `local` placement on a CPU the
encoder and the sampler share the same cores, and smaller chunks batch less, so a smaller reward
share need not mean a shorter step; with the Ray pool or an embeddings server on their own
hardware the hidden scoring time is saved. Only `time/*` are compared: the policy trains on between
steps, so the rollouts of the two variants are not the same ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_rlsr.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=4, help="reward.overlap_chunks of the overlapped variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant (alternating)")
    parser.add_argument("--set", action="append", default=[], help="config overrides (key=value)")
    args = parser.parse_args(argv)

    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    init_distributed(ParallelDims())
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(REPO / "conf/rlsr_tiny.yaml", ["pretrain.steps=20", "trainer.heldout_eval=false",
                                                         "trainer.progress_bar=false", f"trainer.output_dir={out}",
                                                         f"trainer.steps={2 * args.steps}", *args.set])
        trainer = RLSRTrainer(cfg)
        samples: dict[int, list[dict]] = {1: [], args.chunks: []}
        try:
            trainer.setup()
            for step in range(2 * args.steps):
                chunks = 1 if step % 2 == 0 else args.chunks
                trainer.cfg.reward.overlap_chunks = chunks
                samples[chunks].append(trainer.train_step())
        finally:
            trainer.close()
            destroy_distributed()

    result = {}
    for chunks, steps in samples.items():
        share = statistics.median(m["time/reward"] / m["time/step"] for m in steps)
        line = {key: statistics.median(m[key] for m in steps)
                for key in ("time/step", "time/generate", "time/reward", "time/reward_overlapped")}
        result[chunks] = {"reward_share": share, **line}
        print(f"overlap_chunks={chunks}: reward share {share:.3f} (time/reward {line['time/reward']:.2f} s of "
              f"time/step {line['time/step']:.2f} s; generate {line['time/generate']:.2f} s; scoring hidden behind "
              f"generation {line['time/reward_overlapped']:.2f} s; median of {len(steps)} steps)")
    ratio = result[args.chunks]["reward_share"] / max(result[1]["reward_share"], 1e-12)
    step_ratio = result[args.chunks]["time/step"] / result[1]["time/step"]
    print(f"reward share, overlap_chunks={args.chunks} / overlap_chunks=1: {ratio:.2f}")
    print(f"time/step, overlap_chunks={args.chunks} / overlap_chunks=1: {step_ratio:.2f} (the overlap pays off only "
          f"where scoring and generation do not compete for the same cores or GPU)")
    return {"ratio": ratio, "step_ratio": step_ratio, **{f"chunks_{k}": v for k, v in result.items()}}


if __name__ == "__main__":
    main()
