"""Write each Slurm recipe's preemption warning, `#SBATCH --signal=B:USR1@N`, from the planner.

    python slurm/set_signal_lead.py           # rewrite the lines in slurm/*.sh
    python slurm/set_signal_lead.py --check   # exit 1 if a script's N is not the planner's (tests)

N (nemo_rlsr/planner/checkpoint.py: `preemption_lead_s`) covers the step in progress and a save
of the largest checkpoint among the configs a script can run, on the cluster each config names.
sbatch reads `#SBATCH` lines as text, so the number has to be in the script: this keeps it the
planner's. Run it after changing a recipe, its layout or the planner.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_rlsr.config import load_config  # noqa: E402
from nemo_rlsr.planner import make_plan  # noqa: E402

# script -> (mode, configs it runs, planner arguments other than the config's own cluster)
RECIPES: dict[str, tuple[str, list[str], dict]] = {
    "rlsr_qwen7b.sh": ("rlsr", ["rlsr_qwen7b_sb.yaml", "rlsr_qwen7b_qwenem.yaml"], {}),
    "rlsr_llama8b.sh": ("rlsr", ["rlsr_llama8b_sb.yaml", "rlsr_llama8b_qwenem.yaml"], {}),
    "rlsr_qwen32b.sh": ("rlsr", ["rlsr_qwen32b_sb.yaml", "rlsr_qwen32b_qwenem.yaml"], {}),
    "rlsr_moe_1t.sh": ("rlsr", ["rlsr_moe_1t.yaml"], {}),
    "sft.sh": ("sft", ["sft_qwen7b.yaml", "sft_llama8b.yaml", "sft_qwen32b.yaml"], {}),
    "rlsr_tiny.sh": ("rlsr", ["rlsr_tiny.yaml"], {"gpus_per_node": 2}),  # 2 CPU ranks
}
SIGNAL_LINE = re.compile(r"^#SBATCH --signal=B:USR1@(\d+)$", re.M)


def lead_s(script: str) -> int:
    """The largest lead time over the configs `script` runs."""
    mode, configs, kwargs = RECIPES[script]
    leads = []
    for name in configs:
        plan = make_plan(load_config(REPO / "conf" / name), mode=mode, **kwargs)
        if plan.preemption_lead_s is None:
            raise SystemExit(f"{name} does not plan ({'; '.join(plan.problems)}): no lead time for {script}")
        leads.append(plan.preemption_lead_s)
    return max(leads)


def current_lead_s(script: str) -> int | None:
    found = SIGNAL_LINE.findall((REPO / "slurm" / script).read_text())
    return int(found[0]) if len(found) == 1 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report scripts whose lead differs; change nothing")
    args = parser.parse_args()
    stale = []
    for script in RECIPES:
        want, have = lead_s(script), current_lead_s(script)
        if have is None:
            raise SystemExit(f"slurm/{script} needs exactly one '#SBATCH --signal=B:USR1@N' line")
        if want == have:
            continue
        stale.append(f"slurm/{script}: --signal=B:USR1@{have}, the planner says {want}")
        if not args.check:
            path = REPO / "slurm" / script
            path.write_text(SIGNAL_LINE.sub(f"#SBATCH --signal=B:USR1@{want}", path.read_text(), count=1))
    if args.check and stale:
        print("\n".join(stale) + "\nrun: python slurm/set_signal_lead.py", file=sys.stderr)
        return 1
    print("\n".join(stale) if stale else "every recipe's signal lead is the planner's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
