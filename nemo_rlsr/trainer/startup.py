"""The one start-up check of a run: every problem of a config for a world size and a machine, at once.

`startup_problems(cfg, machine, mode)` collects, as sentences naming the keys:

- the rules on the config alone (config/rules.py): keys this build cannot act on, ranges and
  choices of single keys, keys that go together, length filters that cannot protect the trainer;
- the layout / recompute / precision rules at the job's world size with the machine's Transformer
  Engine, GPU and CUDA (distributed/layout.py), once every parallel and batch size is positive;
- the rollout engine's rules with the machine's CUDA and TensorRT-LLM (generation/factory.py, RLSR).

The trainers run it (`check_startup`, trainer/run.py) with `Machine.here` and the launcher's world
size before any process group, data or model exists, so a bad config ends with one ConfigError
listing everything (`nemo-rlsr` exits 2) instead of a traceback minutes later. `nemo-rlsr plan`
runs the same function for a GPU node of the recipe's cluster running our image
(`Machine.container`), so a recipe the planner passes does not die at start-up on the cluster.
Problems of the data itself (a row too long, too few rows for one batch) show when it is read
(DatasetError). Pure: no torch import unless `Machine.here` is asked. docs/design.md: where each
rule set lives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nemo_rlsr.config import ConfigError, RLSRConfig
from nemo_rlsr.config.rules import config_problems, placement_problems, size_problems
from nemo_rlsr.distributed.layout import run_problems
from nemo_rlsr.generation.factory import engine_problems

# The Transformer Engine of our image (Dockerfile: nvcr.io/nvidia/tensorrt-llm/release:1.2.0, built on
# nvcr.io/nvidia/pytorch:25.12-py3, whose TE it keeps). Inferred, not read off a manifest: NGC PyTorch
# ships the TE release current at its build, TE tagged v2.10 on 2025-11-26 and v2.11 on 2025-12-17
# (github.com/NVIDIA/TransformerEngine tags), the 25.12 container is dated 2025-12-22. The version only
# gates FP8 recipes (models/precision.py RECIPE_MIN_TE, 2.3 at most), where 2.10 and 2.11 decide
# alike; the image's real versions are in /opt/nemo_rlsr/versions.txt (containers/check_image.py).
CONTAINER_TE_VERSION = "2.10"
# The CUDA toolkit torch is built with in that image (NGC PyTorch 25.12: CUDA 13.1; docs/launch.md);
# blockwise FP8 needs >= 12.9 (models/fp8_support.py).
CONTAINER_CUDA_VERSION = "13.1"


@dataclass(frozen=True)
class Machine:
    """What the start-up checks read from where a job runs."""

    world_size: int
    te_version: str | None  # Transformer Engine whose PyTorch extension imports; None: none
    capability: tuple[int, int] | None  # the GPUs' CUDA compute capability; None: no GPU
    cuda: bool
    trtllm: bool  # TensorRT-LLM imports
    cuda_version: str | None = None  # the CUDA toolkit torch is built with (`torch.version.cuda`); None: no GPU

    @classmethod
    def here(cls, world_size: int) -> "Machine":
        import torch

        from nemo_rlsr.generation.factory import trtllm_importable
        from nemo_rlsr.models.fp8_support import cuda_runtime_version
        from nemo_rlsr.models.precision import gpu_capability, installed_te_version

        return cls(world_size, installed_te_version(), gpu_capability(), torch.cuda.is_available(),
                   trtllm_importable(), cuda_runtime_version())

    @classmethod
    def container(cls, world_size: int, capability: tuple[int, int] | None) -> "Machine":
        """A job of `world_size` ranks in our image on GPUs of `capability` (None: a machine without
        GPUs, which has neither CUDA nor the image's TE and TensorRT-LLM)."""
        if capability is None:
            return cls(world_size, None, None, False, False)
        return cls(world_size, CONTAINER_TE_VERSION, capability, True, True, CONTAINER_CUDA_VERSION)


def startup_problems(cfg: RLSRConfig, machine: Machine, mode: str = "rlsr") -> list[str]:
    """Every start-up rule `cfg` breaks on `machine` (`mode`: "rlsr" or "sft"), as sentences naming
    the keys; empty when the trainer would start."""
    problems = config_problems(cfg, mode)
    if not size_problems(cfg, mode):  # the layout rules divide by these sizes
        problems += run_problems(cfg, machine.world_size, machine.te_version, machine.capability, mode,
                                 machine.cuda_version)
    if mode == "rlsr":
        problems += engine_problems(cfg, machine.cuda, machine.trtllm)
        problems += placement_problems(cfg, machine.cuda)
    return problems


def check_startup(cfg: RLSRConfig, machine: Machine, mode: str = "rlsr") -> None:
    """Raise one ConfigError naming every problem of `startup_problems`."""
    problems = startup_problems(cfg, machine, mode)
    if problems:
        raise ConfigError(f"this run cannot start on {machine.world_size} rank(s):\n  " + "\n  ".join(problems))


def launched_world_size() -> int:
    """The job's world size as the launcher (torchrun, srun) sets it, before any process group exists
    (the variable init_distributed reads)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def resolved_config(cfg: RLSRConfig) -> RLSRConfig:
    """`cfg` with the model shape of `model.hf_path`'s config.json (the start-up rules need the shape);
    a checkpoint that cannot be read as one is a config problem."""
    from nemo_rlsr.models.hf.start import with_hf_model

    try:
        return with_hf_model(cfg)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"model.hf_path={cfg.model.hf_path}: {exc}") from exc
