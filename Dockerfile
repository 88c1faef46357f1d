# syntax=docker/dockerfile:1
# nemo_rlsr on NVIDIA's TensorRT-LLM release image (what verl ships for its TRT-LLM path).
#
# Base: nvcr.io/nvidia/tensorrt-llm/release:1.2.0 = TensorRT-LLM 1.2 built on
# nvcr.io/nvidia/pytorch:25.12-py3 (TensorRT-LLM 1.2 release notes, "Infrastructure Changes"):
# Ubuntu 24.04, Python 3.12, CUDA 13.1, NVIDIA's PyTorch 2.10.0a0 build (PyTorch release notes
# 25.12; TensorRT-LLM's Dockerfile keeps the base's torch, TORCH_INSTALL_TYPE=skip), Transformer
# Engine as shipped in that PyTorch container, transformers 4.57.x, NCCL, HPC-X/UCX.
# The image's exact versions are written to /opt/nemo_rlsr/versions.txt at build time.
#
# On top: megatron-core (--no-deps) and nemo_rlsr's few pure-Python dependencies. Nothing the
# base ships is replaced: its `pip freeze` becomes pip constraints, and the build fails if torch
# changed. Build with containers/build.sh; make a pyxis squashfs with containers/enroot_import.sh.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1

# What the base ships, frozen (name==version lines only: editable/URL installs cannot be constraints).
RUN mkdir -p /opt/nemo_rlsr \
 && python -m pip list --format=freeze | grep -E '^[A-Za-z0-9_.-]+==' > /opt/nemo_rlsr/base-constraints.txt \
 && python -c "import torch; print(torch.__version__)" > /opt/nemo_rlsr/base-torch-version.txt

WORKDIR /workspace/nemo_rlsr
COPY containers/requirements.txt containers/install_extras.sh containers/check_image.py containers/
RUN bash containers/install_extras.sh containers/requirements.txt /opt/nemo_rlsr/base-constraints.txt

# The package itself, without dependencies (all installed above). At run time slurm/launch.sh
# mounts the repository over /workspace/nemo_rlsr and puts it first on PYTHONPATH.
COPY pyproject.toml README.md ./
COPY nemo_rlsr nemo_rlsr
RUN python -m pip install --no-deps . \
 && python containers/check_image.py /opt/nemo_rlsr/base-torch-version.txt
COPY conf conf
COPY slurm slurm
