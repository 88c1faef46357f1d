"""Memory and step-time model of a config on a cluster (`nemo-rlsr plan`).

hardware.py  device numbers (with sources) and assumed efficiencies
shapes.py    parameter counts and per-token sizes of the model, reward encoders
layout.py    the parallel layout and megatron's divisibility rules
activations.py / memory.py   per-GPU memory, phase by phase
timing.py    step-time estimate
checkpoint.py  checkpoint save time and the preemption warning a Slurm job needs
plan.py      `make_plan`, the report, the launcher's env file
"""

from nemo_rlsr.planner.plan import Plan, format_plan, make_plan, write_launch_env

__all__ = ["Plan", "format_plan", "make_plan", "write_launch_env"]
