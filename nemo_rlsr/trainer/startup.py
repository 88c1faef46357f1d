"""What the trainers check at start-up, before data or a model is loaded, as one list of problems.

`startup_problems(cfg, machine, mode)` is every rule the run breaks on `machine`: config keys this
build cannot act on (config.unsupported_problems), the layout / recompute / precision rules at the
job's world size with the machine's Transformer Engine and GPU (distributed/layout.run_problems),
the rollout engine's (generation/factory.check_engine, RLSR), and the trainers' own (below). The
trainers raise them all at once on the machine they run on (`check_startup`, `Machine.here`);
`nemo-rlsr plan` runs the same function for a GPU node of the recipe's cluster running our image
(`Machine.container`), so a recipe the planner passes does not die at start-up on the cluster after
the container, Ray and the data have loaded. Pure: no torch import unless `Machine.here` is asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_rlsr.config import ConfigError, RLSRConfig, unsupported_problems
from nemo_rlsr.distributed.layout import run_problems
from nemo_rlsr.generation.factory import check_engine

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


def engine_problems(cfg: RLSRConfig, machine: Machine) -> list[str]:
    try:
        check_engine(cfg, machine.cuda, machine.trtllm)
    except ConfigError as exc:
        return [str(exc)]
    return []


def trainer_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """The trainers' own rules (pre-training, checkpoints, groups, the HF tokenizer)."""
    out = []
    if cfg.model.hf_path and not cfg.data.tokenizer_path:
        # the word tokenizer's ids would index unrelated embedding rows of the HF model
        out.append(f"model.hf_path={cfg.model.hf_path} needs data.tokenizer_path (the model's HF tokenizer "
                   f"directory, usually the same folder)")
    if cfg.trainer.keep_last_checkpoints < 0:
        out.append("trainer.keep_last_checkpoints must be >= 0 (0 keeps every checkpoint)")
    if mode == "sft":
        if cfg.pretrain.steps:
            out.append("`pretrain.steps` must be 0 for `nemo-rlsr sft` (it starts from random init or from "
                       "`pretrain.init_checkpoint`)")
        return out
    if cfg.pretrain.init_checkpoint and cfg.pretrain.steps:
        out.append("pretrain.init_checkpoint and pretrain.steps > 0 are exclusive: the base is loaded, not pre-trained")
    if cfg.grpo.num_generations < 2:
        out.append("grpo.num_generations must be >= 2: advantages are relative within a group")
    return out


def data_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """The length filters must make every kept row fit model.max_sequence_length, so that a long row
    is dropped and counted at load time (data/dataset.py) instead of stopping the trainer, which
    refuses a prompt + rollout.max_new_tokens (RLSR) or a prompt + reference + eos (SFT) longer
    than that."""
    d, limit = cfg.data, cfg.model.max_sequence_length
    if d.format == "instructions":
        return [f"data.{key}={getattr(d, key)} is not applied to data.format=instructions (the bundled demo "
                f"reader has no filters): set data.format to the file's (tulu | infinity | prompt_response | auto)"
                for key in ("max_prompt_tokens", "max_reference_tokens") if getattr(d, key) is not None]
    if mode == "rlsr" and d.max_prompt_tokens is not None and d.max_prompt_tokens + cfg.rollout.max_new_tokens > limit:
        return [f"data.max_prompt_tokens={d.max_prompt_tokens} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                f"exceeds model.max_sequence_length={limit}: a kept prompt could stop the trainer"]
    if (mode == "sft" and None not in (d.max_prompt_tokens, d.max_reference_tokens)
            and d.max_prompt_tokens + d.max_reference_tokens + 1 > limit):
        return [f"data.max_prompt_tokens={d.max_prompt_tokens} + data.max_reference_tokens={d.max_reference_tokens} "
                f"+ eos exceeds model.max_sequence_length={limit}: a kept row could stop the trainer"]
    return []


def startup_problems(cfg: RLSRConfig, machine: Machine, mode: str = "rlsr") -> list[str]:
    """Every start-up rule `cfg` breaks on `machine` (`mode`: "rlsr" or "sft"), as sentences naming
    the keys; empty when the trainer would start."""
    problems = unsupported_problems(cfg) + run_problems(cfg, machine.world_size, machine.te_version,
                                                        machine.capability, mode, machine.cuda_version)
    if mode == "rlsr":
        problems += engine_problems(cfg, machine)
    return problems + trainer_problems(cfg, mode) + data_problems(cfg, mode)


def check_startup(cfg: RLSRConfig, machine: Machine, mode: str = "rlsr") -> None:
    problems = startup_problems(cfg, machine, mode)
    if problems:
        raise ConfigError(f"this run cannot start on {machine.world_size} rank(s):\n  " + "\n  ".join(problems))
