"""Steps/s of asynchronous GRPO (a separate rollout worker, grpo.max_staleness) against the sequential loop.

    python benchmarks/async_bench.py                              # demo shape, 12 steps per variant
    python benchmarks/async_bench.py --steps 4 --set grpo.prompts_per_step=4   # smoke

One run of `nemo-rlsr train` per variant on the demo config (conf/rlsr_tiny.yaml: 16 prompts x 8
samples, MiniLM reward; base pre-training cut to --pretrain-steps, since only speed is measured),
one after another in this run, every process with one torch thread unless said otherwise:

* sync: today's colocated loop, one process (the baseline of every ratio);
* sync_2threads: the same loop with two torch threads (both cores to one process);
* async_s0: the worker in a second process, grpo.max_staleness=0 (the same rollouts as sync: the
  processes take turns, so this shows the refit's and the hand-off's cost);
* async_s1: grpo.max_staleness=1, the worker generates step k+1 while the trainer trains step k.

steps/s = the steps after the first two (warm-up) over the sum of their time/step (the trainer's
whole step: waiting for rollouts, scoring, logprobs, update, refit). `predicted_s1_step_s` is the
planner's asynchronous step model (planner/timing.overlapped_step_seconds) applied to the async_s0
run's measured phases (they take turns there): max(generation, the trainer's own work) + refit,
checked against async_s1. (Not the sync run's: with reward.overlap_chunks=1 its time/generate
includes the scoring, which runs inside the generate loop.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_rlsr.planner.timing import overlapped_step_seconds  # noqa: E402

STALE_1 = ["rollout.placement=separate", "grpo.max_staleness=1", "grpo.tis_cap=2.0"]
VARIANTS = {  # name -> (torch threads per process, processes, overrides)
    "sync": (1, 1, []),
    "sync_2threads": (2, 1, []),
    "async_s0": (1, 2, ["rollout.placement=separate"]),
    "async_s1": (1, 2, STALE_1),
}
WARMUP = 2


def run_variant(overrides: list[str], threads: int, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "nemo_rlsr.cli", "train", "--config", str(REPO / "conf" / "rlsr_tiny.yaml"),
            *overrides, f"trainer.output_dir={out}"]
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean(records: list[dict], key: str) -> float:
    return sum(r.get(key, 0.0) for r in records) / len(records)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps per variant (the first 2 are warm-up)")
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="config overrides (key=value), every variant")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    common = [f"trainer.steps={args.steps}", f"pretrain.steps={args.pretrain_steps}", "trainer.heldout_eval=false",
              "trainer.progress_bar=false", *args.set]
    print(f"config=conf/rlsr_tiny.yaml steps={args.steps} warmup={WARMUP} cpus={os.cpu_count()} "
          f"overrides={' '.join(args.set) or '-'}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (threads, processes, overrides) in VARIANTS.items():
            timed = run_variant(common + overrides, threads, Path(tmp) / name)[WARMUP:]
            step_s = mean(timed, "time/step")
            results[name] = {"threads": threads, "processes": processes, "steps_per_s": 1 / step_s, "step_s": step_s,
                             "generate_s": mean(timed, "time/generate"),
                             "trainer_idle_s": mean(timed, "async/trainer_idle_s"),
                             "generation_idle_s": mean(timed, "async/generation_idle_s"),
                             "refit_wait_s": mean(timed, "async/refit_wait_s"),
                             "refit_s": mean(timed, "refit/seconds"), "reward_mean": mean(timed, "reward/mean")}
    base, s0 = results["sync"], results["async_s0"]
    # async_s0's phases, which take turns: the worker's generation, the trainer's own work (its step
    # less its waits for rollouts and for the worker to take a refit, and the refit), the refit
    phases = {"generation": s0["generate_s"],
              "trainer": s0["step_s"] - s0["trainer_idle_s"] - s0["refit_wait_s"] - s0["refit_s"],
              "refit": s0["refit_s"]}
    for name, r in results.items():
        r["ratio_vs_sync"] = r["steps_per_s"] / base["steps_per_s"]
        print(f"variant={name} processes={r['processes']} threads_per_process={r['threads']} "
              f"steps_per_s={r['steps_per_s']:.3f} step_s={r['step_s']:.3f} generate_s={r['generate_s']:.3f} "
              f"trainer_idle_s={r['trainer_idle_s']:.3f} refit_wait_s={r['refit_wait_s']:.3f} "
              f"generation_idle_s={r['generation_idle_s']:.3f} "
              f"refit_s={r['refit_s']:.4f} ratio_vs_sync={r['ratio_vs_sync']:.2f}")
    predicted = overlapped_step_seconds(phases)
    print(f"predicted_s1_step_s={predicted:.3f} measured_s1_step_s={results['async_s1']['step_s']:.3f} "
          f"(the planner's model on async_s0's phases: generation {phases['generation']:.3f} s, trainer "
          f"{phases['trainer']:.3f} s, refit {phases['refit']:.4f} s)")
    return results


if __name__ == "__main__":
    main()
