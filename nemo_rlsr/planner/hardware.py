"""Hardware numbers the planner computes with, and the efficiencies it assumes.

Every number is either a vendor figure (source named next to it) or an assumption (marked
ASSUMED, with the reason). Nothing here was measured on a GPU: the development machines have none.
Change an assumption here and `docs/make_recipe_table.py` regenerates the recipe table from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_rlsr.config import ConfigError

GiB = 1024**3

H100_DATASHEET = "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM5 column)"
H200_DATASHEET = "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM column)"
DGX_H100_GUIDE = "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html"


@dataclass(frozen=True)
class Device:
    """One accelerator and its links. Bandwidths are per direction, per device."""

    name: str
    memory_bytes: int  # what the driver reports as total (nvidia-smi memory.total)
    peak_flops: float  # dense, in the training dtype (bf16 on GPUs, fp32 on the CPU)
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # NVLink (GPU <-> GPU inside a node)
    inter_node_bytes_per_s: float  # InfiniBand NIC bytes per device
    runtime_reserve_bytes: int  # CUDA context, cuBLAS/NCCL workspaces: never available to tensors
    source: str
    compute_capability: tuple[int, int] | None = None  # what the trainer's start-up checks see; None: no GPU


DEVICES: dict[str, Device] = {
    "h100-80gb": Device(
        name="h100-80gb",
        memory_bytes=81559 * 1024**2,  # nvidia-smi memory.total of an H100 80GB HBM3
        peak_flops=989.4e12,  # datasheet: 1,979 TFLOP/s bf16 *with sparsity*; dense is half
        hbm_bytes_per_s=3.35e12,  # datasheet: 3.35 TB/s HBM3
        intra_node_bytes_per_s=450e9,  # datasheet: NVLink 900 GB/s, both directions together
        inter_node_bytes_per_s=50e9,  # DGX H100: one 400 Gb/s ConnectX-7 (NDR) per GPU
        runtime_reserve_bytes=3 * GiB,  # ASSUMED: ~0.5 GiB context + NCCL/cuBLAS workspaces
        source=f"{H100_DATASHEET}; {DGX_H100_GUIDE}",
        compute_capability=(9, 0),  # Hopper (CUDA's compute capability table: H100 and H200 are 9.0)
    ),
    "h200-141gb": Device(
        name="h200-141gb",
        memory_bytes=143771 * 1024**2,  # nvidia-smi memory.total of an H200
        peak_flops=989.4e12,  # datasheet: 1,979 TFLOP/s bf16 with sparsity (same die as H100)
        hbm_bytes_per_s=4.8e12,  # datasheet: 4.8 TB/s HBM3e
        intra_node_bytes_per_s=450e9,  # datasheet: NVLink 900 GB/s
        inter_node_bytes_per_s=50e9,  # ASSUMED: DGX H200 keeps DGX H100's 8x 400 Gb/s NICs
        runtime_reserve_bytes=3 * GiB,
        source=f"{H200_DATASHEET}; {DGX_H100_GUIDE}",
        compute_capability=(9, 0),
    ),
    # The development machine: memory is not a constraint there and times are only nominal
    # (2 cores x AVX2 fp32 FMA at ~3 GHz; one DDR4 channel). The trainer logs real times.
    "cpu": Device(
        name="cpu",
        memory_bytes=64 * GiB,
        peak_flops=0.1e12,
        hbm_bytes_per_s=20e9,
        intra_node_bytes_per_s=10e9,
        inter_node_bytes_per_s=1e9,
        runtime_reserve_bytes=0,
        source="nominal (development machine); not a performance model",
    ),
}

# The allocator fragments: plan to fill at most this share of what is left after the reserve.
# ASSUMED from the usual PyTorch caching-allocator overhead of 5-10% on long training runs.
FRAGMENTATION_HEADROOM = 0.08


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak the plan assumes (ASSUMED; none measured here, all to be calibrated).

    Training MFU 0.40 dense: megatron-core reports roughly 40-47% MFU for dense GPT training on
    H100 at these sizes; MoE 0.25: grouped GEMMs are smaller and the all-to-all is not hidden.
    Forward-only passes run bigger effective batches (no backward), prefill is compute-bound and
    decode is bound by HBM bandwidth. Small encoders (MiniLM, 22M parameters) cannot fill an H100.
    """

    train_dense: float = 0.40
    train_moe: float = 0.25
    forward: float = 0.45
    prefill: float = 0.50
    decode_flops: float = 0.30
    decode_hbm: float = 0.70
    reward_small: float = 0.10
    reward_large: float = 0.40
    link: float = 0.80  # NCCL bus bandwidth / link bandwidth
    collective_latency_s: float = 10e-6  # one small NVLink all-reduce in a decode step


EFFICIENCY = Efficiency()


def device(name: str) -> Device:
    if name not in DEVICES:
        raise ConfigError(f"cluster.gpu (--gpu) {name!r} is not a known device; known: {', '.join(DEVICES)}")
    return DEVICES[name]
