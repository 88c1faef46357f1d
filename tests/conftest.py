import os

import pytest
import torch


@pytest.fixture(scope="session")
def single_rank():
    """One-process gloo group with megatron parallel state (TP=1, PP=1), shared by the session.

    init_distributed puts MASTER_ADDR/MASTER_PORT into os.environ; they are taken out again, else
    every CLI subprocess launched later in the session inherits them and fails to bind that port."""
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed

    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    ctx = init_distributed(ParallelDims(seed=1234))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return ctx


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
